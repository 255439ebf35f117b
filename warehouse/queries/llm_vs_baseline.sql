-- Per layer and kind, the chosen explanations' TEST-split scores: the LLM's and the token-space
-- explanation judged by the same simulator, and the exact token-lookup reference; with the mean
-- control and gap (a kind whose gap is ~0 is not told apart from another unit's explanation).
select layer, kind,
       count(*) as units,
       count(corr_all) as scored,
       round(avg(corr_all), 3) as mean_score,
       round(avg(control_corr_all), 3) as mean_control,
       round(avg(gap), 3) as mean_gap,
       round(avg(r2_all), 3) as mean_r2,
       round(avg(absdev_all), 3) as mean_absdev
from atlas.scores
where split = 'test' and selected
group by layer, kind
order by layer, kind;

-- Mean scores of the LLM explanations vs the token-lookup baseline, per layer; failures counted.
select layer, kind,
       count(*) as explanations,
       count(corr_all) as scored,
       round(avg(corr_all), 3) as mean_corr,
       round(avg(r2_all), 3) as mean_r2,
       round(avg(absdev_all), 3) as mean_absdev
from atlas.scores
group by layer, kind
order by layer, kind;

-- The best-explained neurons: LLM explanations ranked by correlation score (top + random).
select s.layer, s.neuron, round(s.corr_all, 3) as score, round(s.corr_top, 3) as top_only,
       round(s.corr_random, 3) as random_only, e.explanation
from atlas.scores s
join atlas.explanations e using (model_id, layer, neuron, kind, sample_index)
where s.kind = 'llm' and s.corr_all is not null
order by s.corr_all desc
limit 20;

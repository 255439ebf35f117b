-- The best-explained units: each unit's chosen explanation ranked by its TEST-split correlation,
-- beside its control (another unit's explanation on the same sequences) and the gap.
select s.layer, s.neuron, s.polarity, s.kind, round(s.corr_all, 3) as score,
       round(s.control_corr_all, 3) as control, round(s.gap, 3) as gap, e.explanation
from atlas.scores s
join atlas.explanations e using (model_id, layer, neuron, polarity, kind, sample_index)
where s.split = 'test' and s.best and s.corr_all is not null
order by s.corr_all desc
limit 20;

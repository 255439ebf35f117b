-- Ablation scores beside the simulation (test-split) scores, per ablated unit: the explanation
-- ablated is the unit's chosen one. Rank correlation: python -m pipeline.infra.report ablation
select a.layer, a.neuron, a.polarity, a.selection, a.kind, round(s.corr_all, 3) as simulation_score,
       round(s.gap, 3) as gap, round(a.ablation_score, 3) as ablation_score, a.kl_mean, a.kl_simulated,
       a.loss_delta_mean, a.loss_delta_simulated, a.ablation_score_reason, a.explanation
from atlas.ablations a
join atlas.scores s using (model_id, layer, neuron, polarity, kind, sample_index)
where s.split = 'test'
order by a.layer, a.ablation_score desc nulls last;

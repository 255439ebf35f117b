-- Ablation scores beside simulation scores, per ablated neuron (the explanation ablated is the
-- neuron's best LLM explanation). Rank correlation: python -m pipeline.report ablation
select a.layer, a.neuron, a.selection, round(s.corr_all, 3) as simulation_score,
       round(a.ablation_score, 3) as ablation_score, a.kl_mean, a.kl_simulated,
       a.loss_delta_mean, a.loss_delta_simulated, a.ablation_score_reason, a.explanation
from atlas.ablations a
join atlas.scores s using (model_id, layer, neuron, sample_index)
where s.kind = 'llm'
order by a.layer, a.ablation_score desc nulls last;

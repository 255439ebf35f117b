-- One row per explained (model, layer, neuron): the best LLM explanation (by corr_all) and its
-- scores, the token-lookup baseline's score, the ablation score (NULL if not ablated), and the
-- five top tokens.
-- requires: top_k_examples, explanations, scores, ablations
create or replace view atlas.neuron_summary as
with best as (
    select s.*, row_number() over (
        partition by s.model_id, s.layer, s.neuron order by s.corr_all desc nulls last, s.sample_index
    ) as pick
    from atlas.scores s
    where s.kind = 'llm'
)
select k.model_id, k.model_revision, k.layer, k.neuron, k.max_activation,
       e.explanation, b.sample_index, b.corr_all as score, b.corr_top, b.corr_random, b.r2_all,
       b.corr_all_reason as score_reason, bl.corr_all as baseline_score, a.ablation_score,
       list_transform(k.top_tokens[1:5], lambda t: t.token) as top_tokens
from atlas.top_k_examples k
join best b on b.model_id = k.model_id and b.layer = k.layer and b.neuron = k.neuron and b.pick = 1
left join atlas.explanations e
    on e.model_id = b.model_id and e.layer = b.layer and e.neuron = b.neuron and e.kind = 'llm'
    and e.sample_index = b.sample_index
left join atlas.scores bl
    on bl.model_id = k.model_id and bl.layer = k.layer and bl.neuron = k.neuron and bl.kind = 'token_lookup'
left join atlas.ablations a on a.model_id = k.model_id and a.layer = k.layer and a.neuron = k.neuron;

-- One row per explained unit (model, layer, neuron, polarity): its best explanation (chosen on the
-- valid split among the LLM's samples and the token-space explanation) with that explanation's
-- TEST-split score, its control (another unit's explanation on the same sequences) and the gap;
-- the test scores of the chosen LLM sample, the token-space explanation and the exact lookup
-- reference; the ablation score (NULL if not ablated); the detection and fuzzing scores of the best
-- explanation (balanced accuracy on held-out quantile samples, with its control's and the gap; NULL
-- where not classified); and the five top tokens.
-- A score means something only where the gap is clearly above zero: see the scores asset's
-- simulator_discriminates check, or `python -m pipeline.infra.report signal`.
-- requires: unit_examples, explanations, scores, ablations, classification_scores
create or replace view atlas.neuron_summary as
with units as (
    select distinct model_id, model_revision, layer, neuron, polarity from atlas.explanations
),
test as (
    select * from atlas.scores where split = 'test'
)
select u.model_id, u.model_revision, u.layer, u.neuron, u.polarity, k.max_activation,
       b.kind as best_kind, b.sample_index, e.explanation,
       b.corr_all as score, b.control_corr_all as control_score, b.gap, b.corr_top, b.corr_random,
       b.r2_all, b.absdev_all, coalesce(b.corr_all_reason, b.failure_reason) as score_reason,
       l.corr_all as llm_score, l.gap as llm_gap, ts.corr_all as token_space_score, ts.gap as token_space_gap,
       tl.corr_all as token_lookup_score, a.ablation_score,
       d.balanced_accuracy as detection_score, d.control_balanced_accuracy as detection_control, d.gap as detection_gap,
       d.auc as detection_auc, f.balanced_accuracy as fuzzing_score, f.control_balanced_accuracy as fuzzing_control,
       f.gap as fuzzing_gap, f.auc as fuzzing_auc,
       list_transform(k.top_tokens[1:5], lambda t: t.token) as top_tokens
from units u
join atlas.unit_examples k
    on k.model_id = u.model_id and k.layer = u.layer and k.neuron = u.neuron
    and coalesce(k.polarity, '+') = u.polarity
left join test b
    on b.model_id = u.model_id and b.layer = u.layer and b.neuron = u.neuron and b.polarity = u.polarity and b.best
left join atlas.explanations e
    on e.model_id = b.model_id and e.layer = b.layer and e.neuron = b.neuron and e.polarity = b.polarity
    and e.kind = b.kind and e.sample_index = b.sample_index
left join test l
    on l.model_id = u.model_id and l.layer = u.layer and l.neuron = u.neuron and l.polarity = u.polarity
    and l.kind = 'llm' and l.selected
left join test ts
    on ts.model_id = u.model_id and ts.layer = u.layer and ts.neuron = u.neuron and ts.polarity = u.polarity
    and ts.kind = 'token_space' and ts.selected
left join test tl
    on tl.model_id = u.model_id and tl.layer = u.layer and tl.neuron = u.neuron and tl.polarity = u.polarity
    and tl.kind = 'token_lookup' and tl.selected
left join atlas.ablations a
    on a.model_id = u.model_id and a.layer = u.layer and a.neuron = u.neuron and a.polarity = u.polarity
left join atlas.classification_scores d
    on d.model_id = u.model_id and d.layer = u.layer and d.neuron = u.neuron and d.polarity = u.polarity
    and d.scorer = 'detection'
left join atlas.classification_scores f
    on f.model_id = u.model_id and f.layer = u.layer and f.neuron = u.neuron and f.polarity = u.polarity
    and f.scorer = 'fuzzing';

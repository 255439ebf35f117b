-- One row per (layer, neuron, record) of activation_records, with the record's tokens.
-- kind: 'top' (by max, descending), 'bottom' (by min, most negative first), 'random',
-- 'quantile' (bins by max) and 'quantile_neg' (bins by -min, bin 0 = least negative); 'bottom' and
-- 'quantile_neg' rows exist only where the negative direction was captured (negative_captured).
-- acts: the record's activations, decoded from its 8-bit codes on [min_act, max_act]
-- (`pipeline.records.dequantize`: the same expression, so Python and SQL read the same floats).
-- requires: activation_records, corpus_tokens
create or replace view atlas.records_long as
with recs as (
    select a.model_id, a.model_revision, a.layer, a.neuron, 'top' as kind, unnest(a.top, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'bottom' as kind, unnest(a.bottom, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'random' as kind, unnest(a.random, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'quantile' as kind, unnest(a.quantile, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'quantile_neg' as kind,
           unnest(a.quantile_neg, recursive := true)
    from atlas.activation_records a
)
select r.model_id, r.model_revision, r.layer, r.neuron, r.kind, r.rank, r.bin, r.seq_id, r.max_act, r.min_act,
       c.tokens,
       list_transform(r.codes, lambda v: (r.min_act::double + v * (r.max_act::double - r.min_act::double) / 255)::float)
           as acts
from recs r
join atlas.corpus_tokens c
  on c.seq_id = r.seq_id and c.model_id = r.model_id and c.model_revision = r.model_revision;

-- One row per (layer, neuron, record) of activation_records, with the record's tokens and activations.
-- record_list: the activation_records list holding the record: 'top' (by max, descending), 'bottom'
-- (by min, most negative first), 'random',
-- 'quantile' (bins by max) and 'quantile_neg' (bins by -min, bin 0 = least negative); 'bottom' and
-- 'quantile_neg' rows exist only where the negative direction was captured (negative_captured).
-- A list holds (rank, seq_id[, bin]); the record's max, min and activations (`acts`) come from
-- sequences_long, which decodes the neuron's stored sequences.
-- requires: activation_records, sequences_long, corpus_tokens
create or replace view atlas.records_long as
with recs as (
    select a.model_id, a.model_revision, a.layer, a.neuron, 'top' as record_list, unnest(a.top, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'bottom' as record_list, unnest(a.bottom, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'random' as record_list, unnest(a.random, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'quantile' as record_list, unnest(a.quantile, recursive := true)
    from atlas.activation_records a
    union all by name
    select a.model_id, a.model_revision, a.layer, a.neuron, 'quantile_neg' as record_list,
           unnest(a.quantile_neg, recursive := true)
    from atlas.activation_records a
)
select r.model_id, r.model_revision, r.layer, r.neuron, r.record_list, r.rank, r.bin, r.seq_id, s.max_act, s.min_act,
       c.tokens, s.acts
from recs r
join atlas.sequences_long s
  on s.model_id = r.model_id and s.model_revision = r.model_revision and s.layer = r.layer
 and s.neuron = r.neuron and s.seq_id = r.seq_id
join atlas.corpus_tokens c
  on c.seq_id = r.seq_id and c.model_id = r.model_id and c.model_revision = r.model_revision;

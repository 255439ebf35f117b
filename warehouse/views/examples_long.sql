-- One row per (layer, neuron, polarity, split record) of unit_examples, with tokens, activations
-- and 0-10 levels. unit_examples holds references: a '+' unit's top records are in the neuron's
-- `top` list of activation_records, a '-' unit's in its `bottom` list and random records in its
-- `random` list (the check examples_complete verifies it); the activations come from
-- sequences_long. acts are the neuron's raw (signed) activations; levels and max_act are in the
-- unit's direction (for polarity '-': relu(-a) / max_activation, where max_activation =
-- |min|), computed as `pipeline.core.units.normalize` does. Rows written before polarity existed read as '+'.
-- record_kind: 'top' or 'random' (the stored struct field `kind`; `simulations` calls it record_kind too).
-- requires: unit_examples, sequences_long, corpus_tokens
create or replace view atlas.examples_long as
with recs as (
    select e.model_id, e.model_revision, e.layer, e.neuron, coalesce(e.polarity, '+') as polarity,
           e.max_activation, unnest(e.records, recursive := true)
    from atlas.unit_examples e
),
decoded as (
    select r.model_id, r.model_revision, r.layer, r.neuron, r.polarity, r.kind as record_kind, r.split, r.split_rank, r.rank,
           r.seq_id, r.max_activation, case when r.polarity = '-' then -1.0 else 1.0 end as sign,
           (case when r.polarity = '-' then -s.min_act else s.max_act end)::float as max_act, s.acts
    from recs r
    join atlas.sequences_long s
      on s.model_id = r.model_id and s.model_revision = r.model_revision and s.layer = r.layer
     and s.neuron = r.neuron and s.seq_id = r.seq_id
)
select d.model_id, d.model_revision, d.layer, d.neuron, d.polarity, d.record_kind, d.split, d.split_rank, d.rank,
       d.seq_id, d.max_act, d.max_activation, c.tokens, d.acts,
       list_transform(d.acts, lambda v: case when d.max_activation > 0
           then least(10, floor(10 * greatest(d.sign * v::double, 0) / d.max_activation::double)) else 0 end
       )::utinyint[] as levels
from decoded d
join atlas.corpus_tokens c
  on c.seq_id = d.seq_id and c.model_id = d.model_id and c.model_revision = d.model_revision;

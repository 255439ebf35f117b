-- One row per (layer, neuron, polarity, split record) of top_k_examples, with tokens and 0-10 levels.
-- acts are the neuron's raw (signed) activations; levels and max_act are in the unit's direction
-- (for polarity '-': relu(-a) / max_activation, where max_activation = |min|). Rows written before
-- polarity existed read as '+'.
-- requires: top_k_examples, corpus_tokens
create or replace view atlas.examples_long as
with recs as (
    select e.model_id, e.model_revision, e.layer, e.neuron, coalesce(e.polarity, '+') as polarity,
           e.max_activation, unnest(e.records, recursive := true)
    from atlas.top_k_examples e
)
select r.model_id, r.model_revision, r.layer, r.neuron, r.polarity, r.kind, r.split, r.split_rank, r.rank,
       r.seq_id, r.max_act, r.max_activation, c.tokens, r.acts, r.levels
from recs r
join atlas.corpus_tokens c
  on c.seq_id = r.seq_id and c.model_id = r.model_id and c.model_revision = r.model_revision;

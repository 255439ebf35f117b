-- One row per (layer, neuron, top token): the tokens that most activate each neuron, best first.
-- requires: top_k_examples
create or replace view atlas.top_tokens as
select e.model_id, e.model_revision, e.layer, e.neuron,
       generate_subscripts(e.top_tokens, 1) as token_rank,
       unnest(e.top_tokens, recursive := true)
from atlas.top_k_examples e;

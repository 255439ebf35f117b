-- One row per (layer, neuron, polarity, top token): the tokens that most activate each unit in its
-- direction (mean_activation of -a for polarity '-'), best first. Rows written before polarity
-- existed read as '+'.
-- requires: unit_examples
create or replace view atlas.top_tokens as
select e.model_id, e.model_revision, e.layer, e.neuron, coalesce(e.polarity, '+') as polarity,
       generate_subscripts(e.top_tokens, 1) as token_rank,
       unnest(e.top_tokens, recursive := true)
from atlas.unit_examples e;

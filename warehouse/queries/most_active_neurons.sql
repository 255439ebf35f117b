-- The 20 neurons with the highest activation, with their top tokens.
select a.layer, a.neuron, round(a.max_activation, 3) as max_activation,
       round(a.positive_frac, 3) as positive_frac,
       list_transform(e.top_tokens[1:5], lambda t: t.token) as top_tokens
from atlas.activation_records a
join atlas.top_k_examples e using (model_id, model_revision, layer, neuron)
order by a.max_activation desc
limit 20;

-- The 20 units (neuron directions) with the strongest activation in their direction, with their top tokens.
select e.layer, e.neuron, coalesce(e.polarity, '+') as polarity, round(e.max_activation, 3) as max_activation,
       round(a.positive_frac, 3) as positive_frac, round(a.negative_frac, 3) as negative_frac,
       list_transform(e.top_tokens[1:5], lambda t: t.token) as top_tokens
from atlas.unit_examples e
join atlas.activation_records a using (model_id, model_revision, layer, neuron)
order by e.max_activation desc
limit 20;

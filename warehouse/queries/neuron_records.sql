-- One unit's explain (train) records as the explainer will see them: token and 0-10 level.
-- Change the layer, neuron and polarity ('+' or '-') below.
select split_rank, seq_id, round(max_act, 3) as max_act,
       list_transform(list_zip(tokens, levels), lambda p: p[1] || ':' || p[2]::varchar) as token_levels
from atlas.examples_long
where layer = 0 and neuron = 0 and polarity = '+' and record_kind = 'top' and split = 'train'
order by split_rank;

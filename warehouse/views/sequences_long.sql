-- One row per (layer, neuron, sequence) of activation_records: each sequence a neuron's records
-- hold is stored once, in its `sequences` list, with its max, min and 8-bit codes on
-- [min_act, max_act]; `acts` decodes them by the expression of `pipeline.core.records.dequantize`,
-- so Python and SQL read the same floats. records_long and examples_long read activations here.
-- requires: activation_records
create or replace view atlas.sequences_long as
with seqs as (
    select a.model_id, a.model_revision, a.layer, a.neuron, unnest(a.sequences, recursive := true)
    from atlas.activation_records a
)
select model_id, model_revision, layer, neuron, seq_id, max_act, min_act,
       list_transform(codes, lambda v: (min_act::double + v * (max_act::double - min_act::double) / 255)::float)
           as acts
from seqs;

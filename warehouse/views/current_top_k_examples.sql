-- The old name of current_unit_examples, kept so saved SQL keeps working. New SQL should read
-- current_unit_examples.
-- requires: current_unit_examples
create or replace view atlas.current_top_k_examples as
select * from atlas.current_unit_examples;

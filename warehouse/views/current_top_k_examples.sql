-- The old name of current_unit_examples, kept so saved SQL keeps working (views are made in name
-- order, so this one reads the tables itself).
-- requires: subject_model, unit_examples
create or replace view atlas.current_top_k_examples as
select t.* from atlas.unit_examples t semi join atlas.subject_model m using (model_id, model_revision);

-- The rows of unit_examples that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, unit_examples
create or replace view atlas.current_unit_examples as
select t.* from atlas.unit_examples t semi join atlas.subject_model m using (model_id, model_revision);

-- The rows of activation_records that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, activation_records
create or replace view atlas.current_activation_records as
select t.* from atlas.activation_records t semi join atlas.subject_model m using (model_id, model_revision);

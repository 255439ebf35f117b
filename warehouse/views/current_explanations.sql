-- The rows of explanations that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, explanations
create or replace view atlas.current_explanations as
select t.* from atlas.explanations t semi join atlas.subject_model m using (model_id, model_revision);

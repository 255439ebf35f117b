-- The rows of ablations that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, ablations
create or replace view atlas.current_ablations as
select t.* from atlas.ablations t semi join atlas.subject_model m using (model_id, model_revision);

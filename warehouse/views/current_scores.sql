-- The rows of scores that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, scores
create or replace view atlas.current_scores as
select t.* from atlas.scores t semi join atlas.subject_model m using (model_id, model_revision);

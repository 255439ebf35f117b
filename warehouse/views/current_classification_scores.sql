-- The rows of classification_scores that belong to the model subject_model holds now: layers
-- written for an earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, classification_scores
create or replace view atlas.current_classification_scores as
select t.* from atlas.classification_scores t semi join atlas.subject_model m using (model_id, model_revision);

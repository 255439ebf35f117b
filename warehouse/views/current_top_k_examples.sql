-- The rows of top_k_examples that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, top_k_examples
create or replace view atlas.current_top_k_examples as
select t.* from atlas.top_k_examples t semi join atlas.subject_model m using (model_id, model_revision);

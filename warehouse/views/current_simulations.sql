-- The rows of simulations that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, simulations
create or replace view atlas.current_simulations as
select t.* from atlas.simulations t semi join atlas.subject_model m using (model_id, model_revision);

-- The rows of corpus_tokens that belong to the model subject_model holds now: layers written for an
-- earlier checkpoint and not rewritten since are left out.
-- requires: subject_model, corpus_tokens
create or replace view atlas.current_corpus_tokens as
select t.* from atlas.corpus_tokens t semi join atlas.subject_model m using (model_id, model_revision);

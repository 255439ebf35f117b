-- The old name of unit_examples (renamed 2026-11-27: it holds a unit's random records too), kept so
-- saved SQL keeps working. New SQL should read unit_examples.
-- requires: unit_examples
create or replace view atlas.top_k_examples as
select * from atlas.unit_examples;

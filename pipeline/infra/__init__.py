"""Infrastructure over the core: the warehouse (DuckDB/DuckLake), SQL checks, the LLM response cache,
OpenAI-compatible server clients, the HTML viewer, reports and the cost estimate. Free of Dagster.
"""

"""Automation: the checkpoint and corpus are observed on a schedule; a change there (or in code version)
reruns exactly the partitions that were already materialized downstream of it, and an unchanged
one reruns nothing. Missing partitions are never filled in automatically: explaining a whole model
is a decision, made by launching it."""

from dagster import (
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DataVersion,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    ScheduleDefinition,
    define_asset_job,
    observable_source_asset,
)

from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.corpus import corpus_fingerprint
from pipeline.core.models import resolve_model


def rerun_condition(optional_deps: tuple[str, ...] = ()) -> AutomationCondition:
    """Rerun materialized partitions when an upstream or the code changed. Optional deps (shown
    when present, like ablations in the viewer) trigger a rerun when updated but, unlike the
    others, do not hold it back while missing."""
    missing = AutomationCondition.any_deps_missing()
    if optional_deps:
        missing = missing.ignore(AssetSelection.assets(*optional_deps))
    return (
        (AutomationCondition.any_deps_updated() | AutomationCondition.code_version_changed()).since_last_handled()
        & ~AutomationCondition.missing()
        & ~missing
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label("rerun materialized partitions when an upstream or the code changed")


RERUN = rerun_condition()


@observable_source_asset(
    group_name="atlas", description="The configured checkpoint; its data version is its revision/hash."
)
def model_checkpoint(subject: SubjectModelResource) -> DataVersion:
    _, identity = resolve_model(subject.model, subject.revision)
    return DataVersion(identity.data_version)


@observable_source_asset(
    group_name="atlas", description="The configured corpus; its data version hashes the settings and local files."
)
def corpus_source(corpus: CorpusResource) -> DataVersion:
    return DataVersion(corpus_fingerprint(corpus.spec()))


observe_model_job = define_asset_job(
    "observe_model", selection=AssetSelection.assets("model_checkpoint", "corpus_source")
)
observe_model_schedule = ScheduleDefinition(
    name="observe_model_hourly",
    job=observe_model_job,
    cron_schedule="0 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
)
automation_sensor = AutomationConditionSensorDefinition(
    "atlas_automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING
)

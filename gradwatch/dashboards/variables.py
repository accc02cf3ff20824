"""The variables both dashboards share: data source, project, and runs named by their names.

A run is picked by its name (the option's text) while queries filter by its id (the option's
value): `query_result` lists one line per run from `gradwatch_run_info`, and the regex's named
groups take the name and the id from it (Prometheus returns labels sorted by name, so `name`,
`project` and `run` come in that order).
"""

from __future__ import annotations

from gradwatch.dashboards.builder import DatasourceVariable, QueryVariable

__all__ = ["DATASOURCE_VARIABLE", "PROJECT", "RUN_REGEX", "runs"]

DATASOURCE_VARIABLE = DatasourceVariable()

PROJECT = QueryVariable("project", "Project", "label_values(gradwatch_run_info, project)", multi=True,
                        include_all=True, all_value=".*")

RUN_REGEX = '/name="(?<text>[^"]*)",project="[^"]*",run="(?<value>[^"]*)"/'


def runs(multi: bool) -> QueryVariable:
    """`$run`: the runs of the chosen projects, shown by name, valued by id. "All" stands for
    every listed run (not `.*`, which would ignore the project)."""
    return QueryVariable(
        "run", "Run", 'query_result(max by (run, name, project) (gradwatch_run_info{project=~"$project"}))',
        multi=multi, include_all=multi, regex=RUN_REGEX)

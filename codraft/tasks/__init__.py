"""The tasks, one module each, registered in `codraft.task.TASKS` (found by module discovery: a new
module here needs no import line anywhere). Each has its own settings (`task.args.<field>`;
`codraft.task.describe_tasks` lists them). How to add one: codraft/tasks/README.md."""

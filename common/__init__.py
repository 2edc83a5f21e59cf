"""What every task shares: distributed helpers, the CLI runner, schedules, atomic I/O, image reading,
results writing and the evaluation data layer. Depends on models/ only; no task folder is imported here."""

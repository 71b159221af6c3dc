"""The run's report: its typed model, and its views (report.json, report.md, pictures)."""

"""The scaling study: its config and budget (config), the trials and their sizes (trials), running
them (runner, launch, pool), what it will do (preview), and what it concludes (results, fits,
analysis, summary, report)."""

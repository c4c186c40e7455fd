"""Pipelines: several runs of the stages (and batch inference between them) started by one
``sdeseg train`` command; each records what it finished so a re-run continues where it stopped."""

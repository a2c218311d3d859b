"""The engine: everything `dd2` does, usable without the command line, one concept per module.

`distill` (the training loops), `runs` (run folders, loading a run's generator), `runtime` (device,
threads, precision), `progress` (the progress protocol), `checkpoint`, `distributed`, `sample`,
`labels`, `sample_sets`, `adm_npz`, `metrics`, `features`, `evaluate`, `speed`, `bundle`, `export`,
`model_card`, `report`. The engine never imports a teacher family: it resolves them through
`dd2cli.plugins`.
"""

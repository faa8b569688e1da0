"""Fine-tuning as a service (issue 22): training files, jobs that train an adapter set in a
bounded process of their own, and their publication into the tenant's store.

    data.py      what a training file may hold, checked line by line
    files.py     uploaded files: rows in the database, bytes by content
    store.py     jobs, events and checkpoints: rows in the database
    auto.py      `auto` hyperparameters from the dataset size
    manager.py   the supervisor: creates, starts, follows, publishes, recovers jobs
    runner.py    where a job's process runs (a child process); ray_runner.py (a Ray task)
    worker.py    the training process itself
    service.py   what the HTTP app holds: the database, the stores, the supervisor
"""

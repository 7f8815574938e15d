"""A space's data splits, with a run's data options applied on top of the space's own."""

from __future__ import annotations


def load_space_data(space, options):
    """Load the space's data. `options` carries data_dir and seed, and train_subset /
    test_subset (None or absent: the space's) as the commands' --data-dir, --seed,
    --train-subset and --test-subset give them; the subset sizes are merged into
    `space.data_kwargs`."""
    from nas.data import load_data

    kwargs = dict(space.data_kwargs)
    for key in ("train_subset", "test_subset"):
        if getattr(options, key, None) is not None:
            kwargs[key] = getattr(options, key)
    space.data_kwargs = kwargs
    # Validate the merged options before touching any file.
    space.data_info()
    return load_data(space.data, data_dir=options.data_dir, seed=options.seed, **kwargs)

"""ConvergenceStopping: a relative plateau criterion over the last k validation epochs (issue 23)."""

from types import SimpleNamespace

import pytest
import torch

from structvae.callbacks import ConvergenceStopping


def feed(callback: ConvergenceStopping, values: list[float]) -> list[bool]:
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, should_stop=False)
    stops = []
    for v in values:
        trainer.callback_metrics["val/loss"] = torch.tensor(v)
        callback.on_validation_end(trainer, None)
        stops.append(trainer.should_stop)
    return stops


def test_stops_once_the_best_of_the_last_k_epochs_improves_by_less_than_rel_tol():
    c = ConvergenceStopping(patience=3, rel_tol=1e-2)
    # at the 5th value the best of the last 3 (84.4) beats the best before (90) by 6 %; at the 6th, 84.3 beats
    # 85 by 0.8 %, under 1 %
    stops = feed(c, [100.0, 90.0, 85.0, 84.5, 84.4, 84.3])
    assert stops == [False, False, False, False, False, True]
    assert c.converged and c.history == pytest.approx([100.0, 90.0, 85.0, 84.5, 84.4, 84.3])


def test_keeps_going_while_improving_and_ignores_sanity_checks_and_missing_metrics():
    c = ConvergenceStopping(patience=2, rel_tol=1e-3)
    assert not any(feed(c, [100.0 - 2 * i for i in range(10)]))
    assert not c.converged
    sanity = SimpleNamespace(sanity_checking=True, callback_metrics={"val/loss": torch.tensor(1.0)}, should_stop=False)
    c.on_validation_end(sanity, None)
    c.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={}, should_stop=False), None)
    assert len(c.history) == 10


def test_state_round_trips_and_bad_settings_are_refused():
    c = ConvergenceStopping(patience=2)
    feed(c, [3.0, 2.0, 1.0])
    d = ConvergenceStopping(patience=2)
    d.load_state_dict(c.state_dict())
    assert d.history == c.history and d.converged == c.converged
    with pytest.raises(ValueError, match="patience"):
        ConvergenceStopping(patience=0)
    with pytest.raises(ValueError, match="rel_tol"):
        ConvergenceStopping(rel_tol=0.0)

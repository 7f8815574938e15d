"""The DDPG agent of the RL searcher: an actor that maps a layer's state to an action in
[0, 1], a critic that scores (state, action), a replay buffer, truncated-normal exploration.

The sizes and rates are HAQ's (Wang et al., CVPR 2019): two hidden layers of 300, actor
learning rate 1e-4, critic 1e-3, batches of 64, rewards less their moving average. Every
step of an episode carries the episode's reward, and the critic regresses it directly
(discount 0): HAQ's discount of 1 makes each layer's target the reward times the layers
still to come, which orders actions the same way but learns through bootstrapped values,
and so needs target networks that this agent does without.

All randomness comes from generators the caller seeds, so that the same sequence of
episodes gives the same weights: a resumed search rebuilds its agent from trials.csv.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

HIDDEN = 300
ACTOR_LR = 1e-4
CRITIC_LR = 1e-3
BATCH = 64
MOVING_ALPHA = 0.5  # weight of the newest batch in the reward baseline
TRUNCNORM_DRAWS = 100  # draws per action before the last one is clipped into [0, 1]


@contextlib.contextmanager
def one_thread():
    """Torch on one thread while the agent runs: its networks are too small to gain from
    more, and on a busy machine several threads cost many times one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Actor(nn.Module):
    def __init__(self, state_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, HIDDEN), nn.ReLU(),
                                 nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                 nn.Linear(HIDDEN, 1), nn.Sigmoid())

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class Critic(nn.Module):
    """Q(state, action): the state and the action each through a layer, summed (HAQ)."""

    def __init__(self, state_dim: int):
        super().__init__()
        self.state = nn.Linear(state_dim, HIDDEN)
        self.action = nn.Linear(1, HIDDEN)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.state(state) + self.action(action))


class ReplayBuffer:
    """The latest `capacity` (state, action, reward) steps."""

    def __init__(self, state_dim: int, capacity: int):
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.capacity, self.size, self.next = capacity, 0, 0

    def add(self, state: torch.Tensor, action: float, reward: float) -> None:
        self.states[self.next] = state
        self.actions[self.next, 0] = action
        self.rewards[self.next, 0] = reward
        self.next = (self.next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int):
        rows = torch.from_numpy(rng.integers(0, self.size, size=min(batch, self.size)))
        return self.states[rows], self.actions[rows], self.rewards[rows]

    def state_dict(self) -> dict:
        return {"states": self.states.clone(), "actions": self.actions.clone(),
                "rewards": self.rewards.clone(), "size": self.size, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.states.copy_(state["states"])
        self.actions.copy_(state["actions"])
        self.rewards.copy_(state["rewards"])
        self.size, self.next = int(state["size"]), int(state["next"])


def truncated_normal(rng: np.random.Generator, mean: np.ndarray, sigma: float) -> np.ndarray:
    """One draw per entry from N(mean, sigma) truncated to [0, 1] (rejection sampling)."""
    out = np.array(mean, dtype=np.float64)
    if sigma <= 0:
        return np.clip(out, 0.0, 1.0)
    todo = np.ones(out.shape, dtype=bool)
    for _ in range(TRUNCNORM_DRAWS):
        draw = rng.normal(mean, sigma)
        accept = todo & (draw >= 0.0) & (draw <= 1.0)
        out[accept] = draw[accept]
        todo &= ~accept
        if not todo.any():
            return out
    out[todo] = np.clip(draw[todo], 0.0, 1.0)
    return out


class DDPG:
    """Actor, critic, their optimisers, the replay buffer and the reward baseline."""

    def __init__(self, state_dim: int, capacity: int, seed: int):
        with torch.random.fork_rng(devices=[]):  # seeded weights, the global stream untouched
            torch.manual_seed(seed)
            self.actor = Actor(state_dim)
            self.critic = Critic(state_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=ACTOR_LR)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=CRITIC_LR)
        self.buffer = ReplayBuffer(state_dim, capacity)
        self.baseline: float | None = None  # moving average of batch rewards
        self.updates = 0

    def act(self, states: torch.Tensor) -> np.ndarray:
        with torch.no_grad(), one_thread():
            return self.actor(states).squeeze(1).double().numpy()

    def update(self, rng: np.random.Generator) -> tuple[float, float]:
        """One gradient step of the critic, then of the actor, on a batch from the buffer;
        their losses."""
        with one_thread():
            return self._update(rng)

    def _update(self, rng: np.random.Generator) -> tuple[float, float]:
        states, actions, rewards = self.buffer.sample(rng, BATCH)
        mean = float(rewards.mean())
        self.baseline = mean if self.baseline is None else (
            self.baseline + MOVING_ALPHA * (mean - self.baseline))
        target = rewards - self.baseline

        critic_loss = nn.functional.mse_loss(self.critic(states, actions), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        actor_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        self.updates += 1
        return float(critic_loss.detach()), float(actor_loss.detach())

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "buffer": self.buffer.state_dict(),
                "baseline": self.baseline, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.buffer.load_state_dict(state["buffer"])
        self.baseline, self.updates = state["baseline"], int(state["updates"])

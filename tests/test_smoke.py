"""A few Self-Flow steps of a tiny DiT on the toy modality lower the flow loss."""

import torch

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.teachers import EMATeacher
from selfflow_core.timesteps import DualTimestep


def test_self_flow_steps_lower_the_flow_loss(one_thread):  # tiny tensors: threads only add overhead
    torch.manual_seed(0)
    adapter = ToyModality.Config().build()
    arrays = adapter.encode(adapter.open_source("waves").read(0, 64))
    batch = adapter.tokenize({k: torch.from_numpy(v) for k, v in arrays.items()})

    cfg = DiT.Config(depth=4, width=32, heads=4)
    student = cfg.build(token_dims=[adapter.token_dim], num_classes=adapter.num_classes)
    teacher = EMATeacher.Config(warmup=True).build()
    teacher.attach(student)
    objective = SelfFlowObjective(ObjectiveConfig(), depth=cfg.depth, width=cfg.width)
    assert (objective.student_layer, objective.teacher_layer) == (1, 3)
    scheduler = DualTimestep.Config().build()
    params = list(student.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    flows, reps = [], []
    for step in range(30):
        plan = scheduler.plan(batch, generator=gen)
        noise = torch.randn(batch.tokens.shape, generator=gen)
        terms = objective(student, teacher, batch, plan, noise)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        teacher.update(student, step=step + 1)
        assert torch.isfinite(terms.total)
        flows.append(terms.flow.item())
        reps.append(terms.rep.item())

    first, last = sum(flows[:5]) / 5, sum(flows[-5:]) / 5
    assert last < 0.95 * first, (first, last, flows)
    assert all(0 <= r <= 2 for r in reps) and any(r > 0 for r in reps)
    assert teacher.ema.updates == 30
    # the warmed-up EMA has moved away from the initial student towards the trained one
    moved = sum((a - b).abs().sum().item() for a, b in
                zip(teacher.model.blocks[0].ada[-1].parameters(),
                    student.blocks[0].ada[-1].parameters()))
    assert moved > 0

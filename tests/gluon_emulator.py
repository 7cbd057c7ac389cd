"""A CPU emulator of Gluon's Hopper operations, to run attention/hopper.py's kernels in tests on a machine without a
GPU (Triton's interpreter cannot run Gluon).

It executes a kernel's own Python source with `gl`, `mbarrier`, `tma` and `warpgroup_mma` replaced by models of their
sm_90 semantics, on CPU tensors: layouts are ignored (a register tensor is a torch tensor of its logical shape), a
warp_specialize partition is one thread, and the programs of the grid run one after another. Its purpose is to catch
what a kernel gets wrong in its logic, not to mimic timing:

* numerics: tile coordinates, masks, scales, the online softmax, what lands where in global memory (every wgmma is
  computed in fp32 from its operands, bf16/fp16 roundings happen where the kernel converts);
* synchronisation: mbarriers with their arrival count, transaction bytes and phase parity; TMA copies, stores and
  reduce-adds that complete at a random later moment (the "TMA engine" is scheduled like a partition); asynchronous
  wgmmas that read shared memory until their warpgroup_mma_wait. The partitions run one at a time and hand over at
  every such operation, in an order drawn from a seeded RNG, so a missing wait shows up as wrong numbers or as one of
  the errors below rather than by luck;
* hazards, reported as EmulationError with the kernel's source line: a read of shared memory that a TMA load is
  still writing, a TMA load or a register store into shared memory that an in-flight wgmma or TMA store still reads,
  an operand changed between a wgmma's issue and its wait, shared memory written by the threads and then read by the
  async proxy (wgmma, TMA store) without fence_async_shared, out-of-bounds pointer loads and stores, a partition that
  ends with wgmmas or TMA stores outstanding, a register operand of an async wgmma that no warpgroup_mma_wait lists
  among its deps from the wgmma's completion on (nothing then stops the compiler from reusing those registers while
  the tensor cores read them: v15's NaN, KERNEL_NOTES.md), and deadlock (every partition waiting, nothing in flight).

What it does not model: layouts and register pressure (the sm_90 compile tests check those), warps within a
partition, memory-model subtleties beyond the fence rule above, timing. Passing here is necessary, not sufficient:
the GPU tests remain the judge.

    emu = Emulator(seed=0, overrides={"_tma_reduce_add": tma_reduce_add})
    emu.launch(kernel, grid, args, constexprs)   # args: tensors, Gluon TensorDescriptors, ints
"""
import random
import sys
import threading
import types

import torch
from triton.experimental.gluon import language as _gl
from triton.experimental.gluon._runtime import GluonJITFunction
from triton.experimental.gluon.language.nvidia import hopper as _hopper
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


class EmulationError(AssertionError):
    """A kernel bug the emulator found (a race, a deadlock, an out-of-bounds access)."""


class _Abort(BaseException):
    """Unwinds the partitions of a program that failed elsewhere."""


def _site(depth=2):
    f = sys._getframe(depth)
    return f"{f.f_code.co_name}:{f.f_lineno}"


_local = threading.local()


def _actor():
    return getattr(_local, "actor", None)


def _writer():
    """Who stores to shared memory: a partition's index, or -2 for the code outside warp_specialize."""
    actor = _actor()
    return -2 if actor is None else actor.index


def _sync(blocked=None):
    """A hand-over point: the running partition lets the scheduler pick who runs next (blocked: a predicate that must
    hold before this partition may continue, and its description)."""
    actor = _actor()
    if actor is not None:
        actor.pause(blocked)
    elif blocked is not None and not blocked[0]():
        cta = _local.cta
        while cta.pending and not blocked[0]():  # outside the partitions: the TMA engine alone can make progress
            cta.pending[0].complete()
        if not blocked[0]():
            raise EmulationError(f"deadlock outside warp_specialize: {blocked[1]}")


class _Int(int):
    """A run-time integer scalar (program ids, integer arguments, loop counters), as Gluon has it: arithmetic with it
    stays one, a comparison gives 0 or 1 that has .to(dtype), and // and % truncate towards zero as in C."""

    def to(self, dtype, **_):
        return float(self) if dtype.is_floating_point else _Int(self)

    __hash__ = int.__hash__


def _c_div(a, b):
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


_INT_OPS = dict(add=int.__add__, sub=int.__sub__, mul=int.__mul__, floordiv=_c_div,
                mod=lambda a, b: a - b * _c_div(a, b), and_=int.__and__, or_=int.__or__, xor=int.__xor__,
                lshift=int.__lshift__, rshift=int.__rshift__,
                lt=int.__lt__, le=int.__le__, gt=int.__gt__, ge=int.__ge__, eq=int.__eq__, ne=int.__ne__)


def _int_method(op, reflected):
    def method(self, other):
        if type(other) is bool or not isinstance(other, int):
            return NotImplemented  # floats, tensors: their own arithmetic
        a, b = (int(other), int(self)) if reflected else (int(self), int(other))
        return _Int(op(a, b))
    return method


for _name, _op in _INT_OPS.items():
    _name = _name.rstrip("_")
    setattr(_Int, f"__{_name}__", _int_method(_op, False))
    if _name not in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(_Int, f"__r{_name}__", _int_method(_op, True))
_Int.__neg__ = lambda self: _Int(-int(self))


def _range(*args):
    return map(_Int, range(*args))


# ----------------------------------------------------------------------------------------------------------------
# Shared memory
# ----------------------------------------------------------------------------------------------------------------
class _Buffer:
    def __init__(self, dtype, shape):
        self.data = torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else \
            torch.zeros(shape, dtype=dtype)  # NaN: a read of memory nobody wrote poisons what it reaches
        self.ids = torch.arange(self.data.numel()).view(shape)
        self.unfenced = torch.full((self.data.numel(),), -1, dtype=torch.int64)  # the partition that wrote it


class SharedView:
    """A view of shared memory (Gluon's shared_memory_descriptor): index, reshape, permute, slice, load, store."""

    def __init__(self, buf, data, ids):
        self.buf, self.data, self.ids = buf, data, ids

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def shape(self):
        return list(self.data.shape)

    def index(self, i):
        return SharedView(self.buf, self.data[i], self.ids[i])

    def reshape(self, shape):
        return SharedView(self.buf, self.data.view(list(shape)), self.ids.view(list(shape)))

    def permute(self, dims):
        return SharedView(self.buf, self.data.permute(list(dims)), self.ids.permute(list(dims)))

    def slice(self, start, length, dim=0):
        return SharedView(self.buf, self.data.narrow(dim, start, length), self.ids.narrow(dim, start, length))

    def mask(self):
        m = torch.zeros(self.buf.data.numel(), dtype=torch.bool)
        m[self.ids.reshape(-1)] = True
        return m

    def load(self, layout=None):
        _sync()
        _cta().check_read(self, "a register load", _site())
        return self.data.clone()

    def store(self, value):
        _sync()
        if value.dtype != self.dtype or list(value.shape) != self.shape:
            raise EmulationError(f"store of {value.dtype} {list(value.shape)} into shared {self.dtype} {self.shape} "
                                 f"at {_site()}")
        _cta().check_write(self, "a register store", _site())
        self.data.copy_(value)
        self.buf.unfenced[self.ids.reshape(-1)] = _writer()


class _Barrier:
    def __init__(self, site):
        self.count = None
        self.site = site

    def init(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _check(self, what):
        if self.count is None:
            raise EmulationError(f"{what} on an mbarrier never initialised (allocated at {self.site})")

    def arrive(self, count):
        self._check("arrive")
        if count > self.pending:
            raise EmulationError(f"{count} arrival(s) on an mbarrier expecting {self.pending} more (allocated at "
                                 f"{self.site})")
        self.pending -= count
        self._complete()

    def expect(self, nbytes):
        self._check("expect")
        self.tx += nbytes
        self.arrive(1)

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._complete()

    def _complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count


class _Barriers:
    """An array of mbarriers in shared memory; .index(i) is an array of one."""

    def __init__(self, items):
        self.items = items

    def index(self, i):
        return _Barriers([self.items[i]])

    def one(self):
        if len(self.items) != 1:
            raise EmulationError(f"an mbarrier operation on an array of {len(self.items)} barriers")
        return self.items[0]


# ----------------------------------------------------------------------------------------------------------------
# Global memory: pointers and TMA descriptors
# ----------------------------------------------------------------------------------------------------------------
class Ptr:
    def __init__(self, flat, off=0):
        self.flat, self.off = flat, off

    def __add__(self, other):
        return Ptr(self.flat, self.off + other)

    __radd__ = __add__


def _indices(ptr, mask, what):
    off = torch.as_tensor(ptr.off).long()
    mask = torch.ones_like(off, dtype=torch.bool) if mask is None else torch.as_tensor(mask).expand_as(off)
    bad = mask & ((off < 0) | (off >= ptr.flat.numel()))
    if bad.any():
        raise EmulationError(f"out-of-bounds {what} at {_site(3)}: offset {off[bad][0].item()} of "
                             f"{ptr.flat.numel()} elements")
    return off, mask


def _load(pointer, mask=None, other=None, **_):
    off, mask = _indices(pointer, mask, "load")
    out = torch.full(off.shape, 0 if other is None else other, dtype=pointer.flat.dtype)
    out[mask] = pointer.flat[off[mask]]
    return out


def _store(pointer, value, mask=None, **_):
    off, mask = _indices(pointer, mask, "store")
    value = torch.as_tensor(value).to(pointer.flat.dtype).expand_as(off)
    pointer.flat[off[mask]] = value[mask]


class _BlockType:
    def __init__(self, shape, dtype):
        self.shape = list(shape)
        self.nbytes = torch.Size(shape).numel() * dtype.itemsize


class _Desc:
    """A host TensorDescriptor as the kernel sees it: the global tensor through the descriptor's own shape and
    strides, and its box (block_type). Boxes read out of bounds as zeros and write only their in-bounds part."""

    def __init__(self, desc):
        base = desc.base
        self.dtype = base.dtype
        self.global_ = torch.as_strided(base, desc.shape, desc.strides, base.storage_offset())
        self.block_type = _BlockType(desc.block_shape, base.dtype)
        self.layout = _LAYOUT

    def _box(self, coord):
        src, dst = [], []
        for c, n, size in zip(coord, self.block_type.shape, self.global_.shape):
            c = int(c)
            lo, hi = max(c, 0), min(c + n, size)
            if hi <= lo:
                return None, None
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
        return tuple(src), tuple(dst)

    def read(self, coord):
        out = torch.zeros(self.block_type.shape, dtype=self.dtype)
        src, dst = self._box(coord)
        if src is not None:
            out[dst] = self.global_[src]
        return out

    def write(self, coord, box, add=False):
        src, dst = self._box(coord)
        if src is None:
            return
        if add:
            self.global_[src] += box[dst].to(self.dtype)
        else:
            self.global_[src] = box[dst].to(self.dtype)


def _box_of(desc, view, what):
    if desc.dtype != view.dtype or torch.Size(desc.block_type.shape).numel() != view.data.numel():
        raise EmulationError(f"{what} of a {desc.dtype} box {desc.block_type.shape} through shared {view.dtype} "
                             f"{view.shape} at {_site(3)}")


# ----------------------------------------------------------------------------------------------------------------
# One program (CTA): its partitions, the TMA engine, the hazards
# ----------------------------------------------------------------------------------------------------------------
class _Op:
    """An asynchronous TMA operation: a load (global -> shared, completes bytes on a barrier), a store or a
    reduce-add (shared -> global)."""

    def __init__(self, cta, kind, desc, coord, view, barrier=None, owner=None, site=""):
        self.cta, self.kind, self.desc, self.coord, self.view = cta, kind, desc, list(coord), view
        self.barrier, self.owner, self.site, self.region = barrier, owner, site, view.mask()
        if kind != "load":
            self.snapshot = view.data.clone()

    def complete(self):
        cta = self.cta
        if self.kind == "load":
            cta.writes.remove(self)
            self.view.data.copy_(self.desc.read(self.coord).view(self.view.data.shape))
            self.view.buf.unfenced[self.view.ids.reshape(-1)] = -1
            self.barrier.complete_tx(self.desc.block_type.nbytes)
        else:
            cta.reads.remove(self)
            _same(self.snapshot, self.view.data, f"shared memory read by a TMA {self.kind} issued at {self.site} "
                                                 "changed before the store completed")
            self.desc.write(self.coord, self.snapshot.view(self.desc.block_type.shape), add=self.kind == "reduce-add")
            self.owner.stores.remove(self)


def _same(a, b, message):
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(bits), b.contiguous().view(bits)
    if not torch.equal(a, b):
        raise EmulationError(message)


class _Token:
    """An asynchronous wgmma: its operands as issued, computed at its warpgroup_mma_wait."""

    def __init__(self, a, b, acc, use_acc, site):
        self.a, self.b, self.acc, self.use_acc, self.site = a, b, acc, use_acc, site
        self.snapshots = [(x, x.data.clone()) for x in (a, b) if isinstance(x, SharedView)]
        self.region = [(x.buf, x.mask()) for x in (a, b) if isinstance(x, SharedView)]
        self.value = None

    def complete(self):
        for view, snap in self.snapshots:
            _same(snap, view.data, f"shared memory read by the wgmma issued at {self.site} changed before its wait")
        a = self.a if isinstance(self.a, torch.Tensor) else self.a.data
        acc = self.acc.value if isinstance(self.acc, _Token) else self.acc
        out = a.float() @ self.b.data.float()
        self.value = acc + out if self.use_acc else out


class _Partition:
    def __init__(self, cta, index, fn, args):
        self.cta, self.index, self.fn, self.args = cta, index, fn, args
        self.name = f"partition {index} ({getattr(fn, '__name__', fn)})"
        self.turn = threading.Semaphore(0)
        self.blocked = None
        self.done = False
        self.error = None
        self.result = None
        self.mma, self.stores = [], []
        self.unkept = []  # completed wgmmas whose register operand no wait has listed among its deps yet
        self.thread = threading.Thread(target=self._body, daemon=True)

    def _body(self):
        _local.actor, _local.cta = self, self.cta
        self.turn.acquire()
        try:
            if self.cta.aborted:
                raise _Abort
            self.result = self.fn(*self.args)
            if self.mma or self.stores:
                raise EmulationError(f"{self.name} ended with {len(self.mma)} wgmma(s) and {len(self.stores)} TMA "
                                     "store(s) outstanding (a missing warpgroup_mma_wait or tma.store_wait)")
            for t in self.unkept:
                raise EmulationError(f"the register operand of the wgmma issued at {t.site} is in no "
                                     "warpgroup_mma_wait's deps from its completion on: nothing keeps its registers "
                                     "from being reused while the tensor cores read them")
        except _Abort:
            pass
        except BaseException as e:  # noqa: B036 - reported by the scheduler, in the launching thread
            self.error = e
        finally:
            self.done = True
            self.cta.baton.release()

    def pause(self, blocked=None):
        self.blocked = blocked
        self.cta.baton.release()
        self.turn.acquire()
        if self.cta.aborted:
            raise _Abort


class _CTA:
    def __init__(self, program, grid, rng, schedule, tma):
        self.program, self.grid, self.rng, self.schedule, self.tma = program, grid, rng, schedule, tma
        self.writes = []  # TMA loads in flight: shared memory they will write
        self.reads = []   # TMA stores in flight: shared memory they still read
        self.partitions = []
        self.buffers = []
        self.baton = threading.Semaphore(0)
        self.aborted = False

    @property
    def pending(self):
        return self.writes + self.reads

    def _overlaps(self, view, ops):
        m = view.mask()
        return [op for op in ops if op.view.buf is view.buf and (op.region & m).any()]

    def _mma_reading(self, view):
        m = view.mask()
        return [t for p in self.partitions for t in p.mma for buf, r in t.region if buf is view.buf and (r & m).any()]

    def check_read(self, view, what, site):
        for op in self._overlaps(view, self.writes):
            raise EmulationError(f"{what} at {site} reads shared memory that the TMA load issued at {op.site} is "
                                 "still writing (wait on its barrier first)")

    def check_async_read(self, view, what, site):
        self.check_read(view, what, site)
        writers = set(view.buf.unfenced[view.ids.reshape(-1)].tolist()) - {-1}
        if writers:
            who = ", ".join("the code before warp_specialize" if w == -2 else self.partitions[w].name
                            for w in sorted(writers))
            raise EmulationError(f"{what} at {site} reads shared memory that {who} stored from registers and has "
                                 "not yet fenced (a missing fence_async_shared, or, from another partition, a read "
                                 "before the barrier that should follow its fence)")

    def check_write(self, view, what, site):
        self.check_read(view, what, site)
        for op in self._overlaps(view, self.reads):
            raise EmulationError(f"{what} at {site} writes shared memory that the TMA {op.kind} issued at {op.site} "
                                 "still reads (tma.store_wait first)")
        for t in self._mma_reading(view):
            raise EmulationError(f"{what} at {site} writes shared memory that the wgmma issued at {t.site} still "
                                 "reads (warpgroup_mma_wait first)")

    def run(self, functions_and_args):
        self.partitions = [_Partition(self, i, fn, args) for i, (fn, args) in enumerate(functions_and_args)]
        for p in self.partitions:
            p.thread.start()
        preempted = []  # others-first: partitions that handed over while able to go on, the most recent last
        try:
            while True:
                for p in self.partitions:
                    if p.blocked is not None and p.blocked[0]():
                        p.blocked = None
                ready = [p for p in self.partitions if not p.done and p.blocked is None]
                ops = self.pending
                if ops and (self.tma == "eager" or self.tma == "random" and self.rng.random() < 1 / (len(ready) + 1)
                            or not ready):
                    ops[self.rng.randrange(len(ops))].complete()
                    continue
                if not ready:
                    if all(p.done for p in self.partitions):
                        break
                    raise EmulationError("deadlock: " + "; ".join(f"{p.name} waits for {p.blocked[1]}"
                                                                  for p in self.partitions if not p.done))
                fresh = [p for p in ready if p not in preempted]
                if self.schedule == "random" or not fresh:
                    pick = self.rng.choice(ready) if self.schedule == "random" else \
                        [p for p in preempted if p in ready][-1]
                else:
                    pick = self.rng.choice(fresh)
                pick.turn.release()
                self.baton.acquire()
                if pick.error is not None:
                    raise pick.error
                if pick in preempted:
                    preempted.remove(pick)
                if not pick.done and pick.blocked is None:
                    preempted.append(pick)
        except BaseException:
            self.aborted = True
            for p in self.partitions:
                if not p.done:
                    p.turn.release()
            for p in self.partitions:
                p.thread.join(timeout=10)
            raise
        for p in self.partitions:
            p.thread.join()
        return self.partitions[0].result


def _cta():
    return _local.cta


# ----------------------------------------------------------------------------------------------------------------
# The emulated modules
# ----------------------------------------------------------------------------------------------------------------
class _Layout:
    """Every layout: layouts do not change a tensor's logical value, which is all the emulator keeps."""

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self


_LAYOUT = _Layout()


class _BarrierLayout(_Layout):
    pass


def _minmax(torch_fn, builtin):
    def f(a, b, *args, **kwargs):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return builtin(a, b)
        return torch_fn(torch.as_tensor(a), torch.as_tensor(b))
    return f


def _where(c, a, b):
    if not any(isinstance(x, torch.Tensor) for x in (c, a, b)):  # scalars stay scalars
        return a if c else b
    return torch.where(torch.as_tensor(c).bool(), a, b)


def _reduce(torch_fn):
    def f(x, axis=None, keep_dims=False, **_):
        if axis is None:
            return torch_fn(x)
        return torch_fn(x, dim=axis, keepdim=keep_dims)
    return f


class _Namespace(types.SimpleNamespace):
    """An emulated module: what the kernels use; anything else fails at its first use, by name."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise EmulationError(f"{name} has no emulation: add it to tests/gluon_emulator.py, or give the kernel helper "
                             "that uses it (inline assembly, a builtin) an Emulator(overrides=...)")


def _gl_namespace():
    g = _Namespace()
    for name in ("float16", "bfloat16", "float32", "int32", "int64"):
        setattr(g, name, getattr(torch, name))
    g.constexpr = lambda x=None: x
    for name in ("SliceLayout", "NVMMADistributedLayout", "DotOperandLayout", "NVMMASharedLayout"):
        setattr(g, name, _LAYOUT)
    g.program_id = lambda axis: _Int(_local.cta.program[axis])
    g.num_programs = lambda axis: _Int(_local.cta.grid[axis])
    g.static_range = _range

    def static_assert(cond, msg=""):
        if not cond:
            raise EmulationError(f"static_assert failed: {msg}")
    g.static_assert = static_assert
    g.cdiv = lambda a, b: (a + b - 1) // b
    g.arange = lambda start, end, layout=None: torch.arange(start, end, dtype=torch.int32)
    g.zeros = lambda shape, dtype, layout=None: torch.zeros(list(shape), dtype=dtype)
    g.full = lambda shape, value, dtype, layout=None: torch.full(list(shape), value, dtype=dtype)
    g.where = _where
    g.maximum = _minmax(torch.maximum, max)
    g.minimum = _minmax(torch.minimum, min)
    g.max = _reduce(torch.amax)
    g.sum = _reduce(torch.sum)
    g.exp2, g.log2 = torch.exp2, torch.log2
    g.convert_layout = lambda x, layout, assert_trivial=False: x
    g.load = _load
    g.store = _store

    def allocate_shared_memory(element_ty, shape, layout, value=None):
        site = _site()
        if isinstance(layout, _BarrierLayout):
            return _Barriers([_Barrier(site) for _ in range(torch.Size(shape).numel())])
        buf = _Buffer(element_ty, list(shape))
        _local.cta.buffers.append(buf)
        view = SharedView(buf, buf.data, buf.ids)
        if value is not None:
            view.data.copy_(value)
        return view
    g.allocate_shared_memory = allocate_shared_memory

    def warp_specialize(functions_and_args, worker_num_warps, worker_num_regs):
        if len(worker_num_warps) != len(functions_and_args) - 1 or len(worker_num_regs) != len(worker_num_warps):
            raise EmulationError("warp_specialize: one warp count and one register budget per worker partition")
        cta = _local.cta
        return cta.run([(fn, tuple(args)) for fn, args in functions_and_args])
    g.warp_specialize = warp_specialize
    return g


def _mbarrier_namespace():
    m = _Namespace(MBarrierLayout=_BarrierLayout)

    def init(bar, count):
        bar.one().init(count)

    def expect(bar, nbytes, pred=True):
        _sync()
        if pred:
            bar.one().expect(nbytes)

    def arrive(bar, *, count=1, pred=True):
        _sync()
        if pred:
            bar.one().arrive(count)

    def wait(bar, phase, pred=True, deps=()):
        if not pred:
            return _sync()
        b, site = bar.one(), _site()
        b._check(f"wait at {site}")
        _sync((lambda: (b.phase & 1) != phase, f"phase {phase} of the mbarrier allocated at {b.site} (at {site})"))

    m.init, m.expect, m.arrive, m.wait = init, expect, arrive, wait
    return m


def _tma_namespace():
    t = _Namespace()

    def async_copy_global_to_shared(tensor_desc, coord, barrier, result, pred=True):
        _sync()
        if not pred:
            return
        site = _site()
        _box_of(tensor_desc, result, "TMA load")
        cta = _cta()
        cta.check_write(result, "a TMA load", site)
        for op in cta._overlaps(result, cta.writes):
            raise EmulationError(f"the TMA load at {site} writes shared memory that the TMA load issued at {op.site} "
                                 "is still writing")
        cta.writes.append(_Op(cta, "load", tensor_desc, coord, result, barrier.one(), site=site))
    t.async_copy_global_to_shared = async_copy_global_to_shared

    def _store_op(kind, tensor_desc, coord, src, site):
        _sync()
        _box_of(tensor_desc, src, f"TMA {kind}")
        cta = _cta()
        cta.check_async_read(src, f"the TMA {kind}", site)
        op = _Op(cta, kind, tensor_desc, coord, src, owner=_actor(), site=site)
        cta.reads.append(op)
        _actor().stores.append(op)

    t.async_copy_shared_to_global = lambda tensor_desc, coord, src: _store_op("store", tensor_desc, coord, src, _site())
    t.reduce_add = lambda tensor_desc, coord, src, site: _store_op("reduce-add", tensor_desc, coord, src, site)

    def store_wait(pendings):
        actor = _actor()
        _sync((lambda: len(actor.stores) <= pendings, f"its TMA stores (at {_site()})"))
    t.store_wait = store_wait
    return t


def tma_reduce_add(tensor_desc, coord, src):
    """The emulation of attention/hopper.py's _tma_reduce_add builtin: global[coord...] += src, asynchronously."""
    return _TMA.reduce_add(tensor_desc, coord, src, _site())


_TMA = _tma_namespace()


def warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    _sync()
    site = _site()
    cta = _cta()
    for x in (a, b):
        if isinstance(x, SharedView):
            cta.check_async_read(x, "a wgmma", site)
    if a.dtype != b.dtype:
        raise EmulationError(f"wgmma of {a.dtype} by {b.dtype} at {site}")
    token = _Token(a, b, acc, use_acc, site)
    if not is_async:
        token.complete()
        return token.value
    _actor().mma.append(token)
    return token


def warpgroup_mma_wait(num_outstanding=0, deps=None):
    if deps is None:
        raise ValueError("warpgroup_mma_wait deps must be given")
    _sync()
    actor = _actor()
    while len(actor.mma) > num_outstanding:
        token = actor.mma.pop(0)
        token.complete()
        if isinstance(token.a, torch.Tensor):
            actor.unkept.append(token)
    actor.unkept = [t for t in actor.unkept if not any(d is t.a for d in deps)]
    out = []
    for d in deps:
        if isinstance(d, _Token):
            if d.value is None:
                raise EmulationError(f"warpgroup_mma_wait at {_site()} returns the wgmma issued at {d.site}, which is "
                                     "still outstanding")
            d = d.value
        out.append(d)
    return out[0] if len(out) == 1 else tuple(out)


def warpgroup_mma_init(value):
    """An accumulator that is already complete (Gluon's warpgroup_mma_accumulator of a tensor)."""
    token = _Token(value, value, value, False, _site())
    token.value = value
    return token


# How the partitions take turns at each hand-over: a random ready one; or others first: a partition that hands over
# while it could go on waits until every other partition has run as far as it can (each window between two of its
# operations is one in which the others do all they can: a barrier released too early is then always exploited).
SCHEDULES = ("random", "others-first")
# When the TMA engine completes an operation in flight: at a random hand-over, at once, or only once no partition can
# run (so that everything a partition does before its wait on the barrier meets the operation still in flight).
TMA_TIMINGS = ("random", "eager", "lazy")


class Emulator:
    """Runs Gluon kernels on CPU tensors. seed: the order in which partitions and the TMA engine take turns.
    overrides: {global name: Python function} for the kernel module's builtins and inline-assembly helpers."""

    def __init__(self, seed=0, schedule="random", tma="random", overrides=None):
        if schedule not in SCHEDULES or tma not in TMA_TIMINGS:
            raise ValueError(f"schedule is one of {SCHEDULES}, tma one of {TMA_TIMINGS}")
        self.rng = random.Random(seed)
        self.schedule, self.tma = schedule, tma
        self.overrides = dict(overrides or {})
        self.gl = _gl_namespace()
        self.replace = {id(_gl): self.gl, id(_hopper.mbarrier): _mbarrier_namespace(), id(_hopper.tma): _TMA,
                        id(_hopper.warpgroup_mma): warpgroup_mma, id(_hopper.warpgroup_mma_wait): warpgroup_mma_wait,
                        id(_hopper.warpgroup_mma_init): warpgroup_mma_init, id(_hopper.fence_async_shared): self._fence}
        self.shadows = {}

    @staticmethod
    def _fence():
        """fence_async_shared: this partition's register stores to shared memory become visible to the async proxy."""
        _sync()
        for buf in _cta().buffers:
            buf.unfenced[buf.unfenced == _writer()] = -1

    def _function(self, jit):
        module = jit.fn.__globals__
        shadow = self.shadows.get(id(module))
        if shadow is None:
            shadow = self.shadows[id(module)] = dict(module)
            for name, value in module.items():
                if isinstance(value, GluonJITFunction):
                    fn = value.fn
                    shadow[name] = types.FunctionType(fn.__code__, shadow, fn.__name__, fn.__defaults__, fn.__closure__)
                elif id(value) in self.replace:
                    shadow[name] = self.replace[id(value)]
                elif getattr(value, "__triton_builtin__", False) and name not in self.overrides:
                    shadow[name] = _unemulated(name)
            shadow["range"] = _range
            shadow.update(self.overrides)
        fn = jit.fn
        return types.FunctionType(fn.__code__, shadow, fn.__name__, fn.__defaults__, fn.__closure__)

    def launch(self, kernel, grid, args, constexprs):
        fn = self._function(kernel)
        args = [_Desc(a) if isinstance(a, TensorDescriptor) else Ptr(a.view(-1)) if isinstance(a, torch.Tensor)
                else _Int(a) if type(a) is int else a for a in args]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        for z in range(grid[2]):
            for y in range(grid[1]):
                for x in range(grid[0]):
                    _local.cta = _CTA((x, y, z), grid, self.rng, self.schedule, self.tma)
                    _local.actor = None
                    fn(*args, **constexprs)


def _unemulated(name):
    def f(*args, **kwargs):
        raise EmulationError(f"the builtin {name} has no emulation: pass one in Emulator(overrides=...)")
    return f

"""The code an ELF object runs as it is loaded, found statically: its initialisers and what they call.

A C++ library runs its static initialisers when it is loaded, before anything
else in it: every translation unit's constructors of globals, registrations
into factories, and the functions those call. In a lazy start each page of
that code is a miss the app waits for, one after another, since the loader
runs initialisers in order on one thread. For torchapp that is most of the
misses access hints left over: libtorch_cpu.so's initialisers touch 90 of
its 1 MiB chunks of code.

The call graph from the initialisers is readable without running anything:

* the roots are DT_INIT and the DT_INIT_ARRAY entries (relocated values: a
  RELA R_X86_64_RELATIVE relocation's addend, an R_X86_64_64 relocation's
  symbol plus addend when the object defines the symbol, as for an exported
  constructor, or the value in place, as with RELR), and a function the
  object's user calls first, if named (a Python extension module's
  PyInit_NAME: numpy's reaches 4 of the 7 chunks its import missed);
* function extents come from `.eh_frame_hdr` (PT_GNU_EH_FRAME), whose
  binary-search table lists the start of every function with unwind
  information, so a function runs to the next start;
* calls are `call rel32` / `jmp rel32` (E8 / E9) whose target is a function
  start, directly or through a PLT stub whose GOT slot a DT_JMPREL relocation
  binds to a symbol this object defines (calls between a library's own
  exported functions go through its PLT);
* functions whose address that code takes (`lea r64, [rip + disp32]` to a
  function start) are taken as called too: that is how an initialiser
  registers a callback (an operator's kernel, a factory, an atexit handler),
  and the start calls many of them soon after, through a table. On torchapp
  that covers 12 of the 24 chunks of libtorch_cpu.so a lazy start still
  missed, for 16 chunks more in the hints; the start misses 29 chunks
  instead of 43 and fetches 75.6 MB instead of 73.6 (3 alternating runs:
  2.36-2.44 s to ready against 2.47-2.49 s). Following the vtables such code
  addresses instead fills the closure's budget with methods nothing calls.

No instruction decoder: every E8/E9 byte is taken as a call, and only
targets that are exactly a function start count, which a random byte pair
almost never hits. Other indirect calls (virtual, through pointers loaded
from data) are not followed. On libtorch_cpu.so the closure of calls alone
is 13,400 functions, 5.2 MB, in 79 chunks, of which 71 are among the 90 its
start reads. x86-64 only.

What that code reads is found the same way: the read-only data (`.rodata`:
strings, tables) its RIP-relative `lea` and `mov` instructions address
(REX.W, 8D or 8B, a ModRM of [rip + disp32]: a three-byte pattern random
bytes rarely make, whose target must also fall in a read-only data section).
libtorch_cpu.so's initialisers register operators by their schema strings,
spread over its 17 MB of `.rodata`: they address 10 of its 18 chunks, and a
start reads all 10 (and 2 more); each was a miss after the code's.
"""

from __future__ import annotations

import bisect
import collections
import re
import struct
from array import array
from collections.abc import Callable

# read(offset, size): bytes of the object's file, or None.
ReadAt = Callable[[int, int], "bytes | None"]

MAX_FUNCTION = 256 << 10  # a function runs to the next start, or this far at most
MAX_CODE = 32 << 20  # function bytes one object's closure may name
MAX_FUNCTIONS = 100_000
MAX_SYMBOLS = 1 << 20  # dynamic symbols looked through for an entry point
BLOCK = 1 << 20  # the unit the object's code is read (and kept) in while it is scanned: a chunk, as built

_EM_X86_64 = 62
_DT_PLTRELSZ, _DT_STRTAB, _DT_SYMTAB, _DT_RELA, _DT_RELASZ, _DT_STRSZ, _DT_INIT = 2, 5, 6, 7, 8, 10, 12
_DT_JMPREL, _DT_INIT_ARRAY, _DT_INIT_ARRAYSZ = 23, 25, 27
_R_X86_64_64, _R_X86_64_RELATIVE = 1, 8
_PF_X = 1
_RELA = struct.Struct("<QQq")
# lea/mov r64, [rip + disp32]: REX.W (any of R, X, B), opcode 8D or 8B, ModRM mod 00 r/m 101.
_RIP_RELATIVE = re.compile(rb"[\x48-\x4f][\x8b\x8d][\x05\x0d\x15\x1d\x25\x2d\x35\x3d]")
_LEA = 0x8D
_SYM = struct.Struct("<IBBHQQ")


def init_reads(machine: int, tags: dict[int, int], loads: list[tuple[int, int, int, int]],
               eh_frame_hdr: tuple[int, int] | None, rodata: list[tuple[int, int]],
               read: ReadAt, entry: bytes | None = None) -> list[tuple[int, int]]:
    """(file offset, size) of each function the object's initialisers may call, transitively, and
    (file offset, 1) of each place in read-only data those functions address.

    `tags` are the dynamic section's first value of each tag, `loads` the PT_LOAD segments as
    (vaddr, offset, filesz, flags), `eh_frame_hdr` PT_GNU_EH_FRAME's (vaddr, filesz), `rodata`
    the (start, end) vaddrs of the object's read-only data, sorted. `entry` names an exported
    function the object's loader calls right after (a Python extension module's PyInit_NAME):
    it counts as an initialiser.
    """
    if machine != _EM_X86_64 or eh_frame_hdr is None:
        return []
    code = _Code(loads, read)
    starts = _function_starts(code, *eh_frame_hdr)
    entries = [v] if entry is not None and (v := _exported(code, tags, entry)) is not None else []
    roots = [r for r in [*_init_functions(code, tags), *entries] if _is_start(starts, r)]
    if not roots:
        return []
    plt = _PltTargets(code, tags)
    seen = set(roots)
    queue = collections.deque(roots)
    callees: dict[int, int | None] = {}  # call target -> the function it enters, if one
    out: list[tuple[int, int]] = []
    data: set[int] = set()
    rodata_starts = [lo for lo, _ in rodata]
    total = 0
    while queue and len(seen) <= MAX_FUNCTIONS and total <= MAX_CODE:
        start = queue.popleft()
        i = bisect.bisect_right(starts, start)
        end = min(starts[i] if i < len(starts) else start + MAX_FUNCTION, start + MAX_FUNCTION)
        body = code.at(start, end - start)
        if body is None:
            continue
        out.append((code.offset(start), len(body)))  # type: ignore[arg-type]  # (at() found it)
        total += len(body)
        addressed = _rip_targets(body, start)
        data.update(t for _, t in addressed if _in(rodata, rodata_starts, t))
        # A function whose address an initialiser takes (lea) is a callback it registers (an
        # operator's kernel, a factory): the start calls many of them soon after, as calls.
        taken = [t for op, t in addressed if op == _LEA]
        for target in [*_call_targets(body, start), *taken]:
            if target in seen:
                continue
            if target not in callees:  # most targets are called from many places
                callee = target if _is_start(starts, target) else plt.resolve(target)
                callees[target] = callee if callee is not None and _is_start(starts, callee) else None
            callee = callees[target]
            if callee is not None and callee not in seen:
                seen.add(callee)
                queue.append(callee)
    return out + [(off, 1) for vaddr in sorted(data) if (off := code.offset(vaddr)) is not None]


def file_offset(loads: list[tuple[int, int, int, int]], vaddr: int) -> int | None:
    """Where `vaddr` is in the file, by the PT_LOAD segments (vaddr, offset, filesz, flags)."""
    for va, off, size, _ in loads:
        if va <= vaddr < va + size:
            return off + vaddr - va
    return None


def _is_start(starts: array, vaddr: int) -> bool:
    i = bisect.bisect_left(starts, vaddr)
    return i < len(starts) and starts[i] == vaddr


def _call_targets(body: bytes, vaddr: int) -> list[int]:
    """Where each E8/E9 byte in `body` (at `vaddr`) would jump, were it an instruction."""
    out = []
    for opcode in b"\xe8\xe9":
        p = body.find(opcode)
        while p != -1 and p + 5 <= len(body):
            rel, = struct.unpack_from("<i", body, p + 1)
            out.append(vaddr + p + 5 + rel)
            p = body.find(opcode, p + 1)
    return out


def _rip_targets(body: bytes, vaddr: int) -> list[tuple[int, int]]:
    """(opcode, address) of each RIP-relative lea/mov in `body` (at `vaddr`), were it an instruction."""
    out = []
    for m in _RIP_RELATIVE.finditer(body):
        end = m.end() + 4  # the instruction's end: rip when it runs
        if end > len(body):
            break
        out.append((body[m.start() + 1], vaddr + end + struct.unpack_from("<i", body, m.end())[0]))
    return out


def _in(spans: list[tuple[int, int]], starts: list[int], vaddr: int) -> bool:
    """Whether `vaddr` is in one of the sorted (start, end) `spans`, whose starts are `starts`."""
    i = bisect.bisect_right(starts, vaddr) - 1
    return i >= 0 and vaddr < spans[i][1]


class _Code:
    """The object's bytes by virtual address, read in blocks kept for the length of one scan."""

    def __init__(self, loads: list[tuple[int, int, int, int]], read: ReadAt):
        self.loads = loads
        self.read = read
        self._blocks: dict[int, bytes | None] = {}

    def offset(self, vaddr: int) -> int | None:
        return file_offset(self.loads, vaddr)

    def at(self, vaddr: int, size: int) -> bytes | None:
        """`size` bytes at `vaddr`, cut at the end of its segment; None outside every segment."""
        for va, off, filesz, _ in self.loads:
            if va <= vaddr < va + filesz:
                start = off + vaddr - va
                end = min(start + size, off + filesz)
                return self._bytes(start, end)
        return None

    def _bytes(self, start: int, end: int) -> bytes | None:
        block = start // BLOCK
        if block == (end - 1) // BLOCK:  # the common case: no join
            if block not in self._blocks:
                self._blocks[block] = self.read(block * BLOCK, BLOCK)
            data = self._blocks[block]
            return None if data is None else data[start - block * BLOCK: end - block * BLOCK]
        parts = []
        for block in range(start // BLOCK, (end - 1) // BLOCK + 1):
            if block not in self._blocks:
                self._blocks[block] = self.read(block * BLOCK, BLOCK)
            data = self._blocks[block]
            if data is None:
                return None
            parts.append(data)
        joined = b"".join(parts)  # type: ignore[arg-type]
        skip = start - start // BLOCK * BLOCK
        return joined[skip: skip + end - start]


def _function_starts(code: _Code, vaddr: int, size: int) -> array:
    """Sorted start addresses from .eh_frame_hdr's search table (GNU ld's and lld's encoding)."""
    head = code.at(vaddr, 12)
    if head is None or len(head) < 12:
        return array("q")
    version, ptr_enc, count_enc, table_enc = head[:4]
    # eh_frame_ptr as (s/u)data4, fde_count as udata4, table entries as datarel sdata4 pairs.
    if version != 1 or ptr_enc & 0x0F not in (0x03, 0x0B) or count_enc != 0x03 or table_enc != 0x3B:
        return array("q")
    count, = struct.unpack_from("<I", head, 8)
    count = min(count, (size - 12) // 8)
    table = code.at(vaddr + 12, count * 8)
    if table is None or len(table) < count * 8:
        return array("q")
    pairs = array("i")
    pairs.frombytes(table)
    return array("q", sorted(vaddr + v for v in pairs[::2]))


def _init_functions(code: _Code, tags: dict[int, int]) -> list[int]:
    """DT_INIT and the DT_INIT_ARRAY entries, relocated."""
    roots = [tags[_DT_INIT]] if tags.get(_DT_INIT) else []
    array_at, array_size = tags.get(_DT_INIT_ARRAY), min(tags.get(_DT_INIT_ARRAYSZ, 0), 1 << 16)
    if array_at is None or not array_size:
        return roots
    raw = code.at(array_at, array_size) or b""
    values = dict(enumerate(v for (v,) in struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8])))
    # Position-independent objects keep the entries' values in RELATIVE relocations' addends.
    relocations = b""
    if _DT_RELA in tags:
        relocations = code.at(tags[_DT_RELA], min(tags.get(_DT_RELASZ, 0), 64 << 20)) or b""
    for r_offset, r_info, addend in _RELA.iter_unpack(relocations[: len(relocations) // 24 * 24]):
        if not array_at <= r_offset < array_at + array_size:
            continue
        if r_info & 0xFFFFFFFF == _R_X86_64_RELATIVE:
            values[(r_offset - array_at) // 8] = addend
        elif r_info & 0xFFFFFFFF == _R_X86_64_64:  # an exported initialiser, bound by its symbol
            symbol = _defined(code, tags.get(_DT_SYMTAB), r_info >> 32)
            if symbol is not None:
                values[(r_offset - array_at) // 8] = symbol + addend
    executable = [(va, va + size) for va, _, size, flags in code.loads if flags & _PF_X]
    return roots + [v for v in values.values() if any(lo <= v < hi for lo, hi in executable)]


def _exported(code: _Code, tags: dict[int, int], name: bytes) -> int | None:
    """The value of the defined dynamic symbol `name`. The symbol table is taken to run up to the
    string table, where linkers put it (an object whose tables were moved gets no answer)."""
    symtab, strtab, strsz = tags.get(_DT_SYMTAB), tags.get(_DT_STRTAB), tags.get(_DT_STRSZ, 0)
    if symtab is None or strtab is None or not symtab < strtab <= symtab + MAX_SYMBOLS * _SYM.size:
        return None
    strings = code.at(strtab, min(strsz, 16 << 20)) or b""
    at = strings.find(b"\0" + name + b"\0") + 1
    table = (code.at(symtab, strtab - symtab) if at else None) or b""
    table = table[: len(table) // _SYM.size * _SYM.size]
    for st_name, _info, _other, shndx, value, _size in _SYM.iter_unpack(table):
        if st_name == at and shndx != 0 and value:
            return value
    return None


class _PltTargets:
    """Where a call into the object's PLT lands when the symbol is the object's own."""

    def __init__(self, code: _Code, tags: dict[int, int]):
        self.code = code
        self.symtab = tags.get(_DT_SYMTAB)
        self._slots: dict[int, int] | None = None  # GOT slot -> symbol index
        self._tags = tags

    def resolve(self, stub: int) -> int | None:
        head = self.code.at(stub, 16)
        if head is None or self.symtab is None:
            return None
        # jmp *slot(%rip), after endbr64 and a bnd prefix when the object was built for IBT.
        for prefix in (b"\xff\x25", b"\xf3\x0f\x1e\xfa\xf2\xff\x25", b"\xf3\x0f\x1e\xfa\xff\x25"):
            if head.startswith(prefix) and len(head) >= len(prefix) + 4:
                disp, = struct.unpack_from("<i", head, len(prefix))
                return self._symbol_value(stub + len(prefix) + 4 + disp)
        return None

    def _symbol_value(self, slot: int) -> int | None:
        if self._slots is None:
            jmprel = self._tags.get(_DT_JMPREL)
            raw = self.code.at(jmprel, min(self._tags.get(_DT_PLTRELSZ, 0), 16 << 20)) if jmprel else None
            raw = raw or b""
            self._slots = {off: info >> 32 for off, info, _ in _RELA.iter_unpack(raw[: len(raw) // 24 * 24])}
        index = self._slots.get(slot)
        return _defined(self.code, self.symtab, index) if index else None


def _defined(code: _Code, symtab: int | None, index: int) -> int | None:
    """The value of dynamic symbol `index` if the object defines it."""
    entry = code.at(symtab + index * _SYM.size, _SYM.size) if symtab is not None else None
    if entry is None or len(entry) < _SYM.size:
        return None
    _name, _info, _other, shndx, value, _size = _SYM.unpack(entry)
    return value if shndx != 0 and value else None

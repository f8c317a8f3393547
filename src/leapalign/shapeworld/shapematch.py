"""ShapeMatch: a differentiable, analytic ShapeWorld reward (no learned weights), a soft relaxation of ShapeEval.

It reads each prompt through the world's grammar and asks of the pixels what ShapeEval asks, softly:

1. Colour masks by ShapeEval's own rule, smooth: a pixel is coloured as far as its saturation (here: the
   chroma projected on the colour's hue, which unlike the saturation is not flat at a grey pixel) and its
   value pass ShapeEval's thresholds (sigmoids instead of steps), and takes the palette colour nearest in
   hue (a softmax over hue cosines instead of an argmin).  The gradient is the value's own.
2. Template matching.  Each requested object's shape template, at each allowed size and four half-pixel
   phases, is slid over the mask of its colour (of any colour when the prompt names none); the response at
   a placement is the soft IoU of the template with the mask inside a window around it, so a wrong shape
   (IoU <= pi/4), a wrong size, a blob or a neighbour merged into the object all score low.  An object that
   another shape's template fits almost as well loses the difference (SHAPE_MARGIN).
3. The best valid layout.  The objects are placed jointly where their summed IoU is highest subject to
   what ShapeEval requires of a layout: inside the canvas, two objects apart (distinct components) and,
   for `position` prompts, in the stated relation with the renderer's margin.  The gradient therefore
   asks for the best *correct* layout, not for the best-looking pieces of a wrong one.  Ties (a blank
   canvas) go to the placement nearest the centre.  The layout is chosen without gradient.
4. Nothing else drawn.  Coloured mass outside the chosen objects (dilated by a pixel for anti-aliasing)
   is penalised in units of the requested objects' area, weighted EXTRA_WEIGHT, so an extra object costs
   twice what a requested one gains: hedging with a third object does not pay, and neither does leaving one out.
5. Smooth shaping terms, zero on a truth render: each requested colour's total mass within what its
   objects can cover, the colour masses' centroids in the stated relation, and the fidelity of object
   interiors to their palette colour and of the canvas to the background.

    reward = IoU - EXTRA_WEIGHT extra - SHAPING_WEIGHT (mass + relation) - FIDELITY_WEIGHT fidelity

About 0.87 for a truth render, below 0 for a blank canvas or junk.  `ShapeMatch().terms` gives each term.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import shapeeval, world

SAT_SLOPE = 0.06  # colour masks: sigmoid width around ShapeEval's MIN_SATURATION
VALUE_SLOPE = 0.05  # ... and around MIN_VALUE
HUE_SHARPNESS = 15.0  # softmax scale of the hue cosines
WINDOW_MARGIN = 2.0  # pixels around a template in which its own colour counts against the IoU
EXTRA_WEIGHT = 2.0
SHAPING_WEIGHT = 0.5  # the smooth terms (colour mass in range, centroids in relation): 0 on a truth render
FIDELITY_WEIGHT = 2.0  # squared RGB error of object interiors to their palette colour and of the canvas to the background
MASS_RANGE = (0.7, 1.3)
RELATION_MARGIN = 4.0  # pixels between the centroids; ShapeEval asks for more than 3
SHAPE_MARGIN = 0.1  # an object's IoU must beat every other shape's template at its place by this much
CENTRE_PRIOR = 1e-4  # layout tie-break per squared pixel from the centre; never in the reward's value
PHASES = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))
SIZE_NAMES = tuple(world.SIZES)  # ("small", "big")
COLOUR_NAMES = tuple(world.COLORS)
_SUPER = 8
_R = math.ceil(max(world.SIZES.values()) + WINDOW_MARGIN + 0.5)  # kernel radius, the same for every size
_N = 2 * _R + 1


def _coverage_grid(shape: str, cx: float, cy: float, half: float, n: int) -> np.ndarray:
    """Anti-aliased coverage (n, n) of one shape centred at (cx, cy) in pixel coordinates."""
    coords = (np.arange(n * _SUPER) + 0.5) / _SUPER
    xs, ys = np.meshgrid(coords, coords)
    cov = world._coverage(world.Shape(shape, "red", cx, cy, half), xs, ys)
    return cov.reshape(n, _SUPER, n, _SUPER).mean(axis=(1, 3)).astype(np.float32)


@lru_cache(maxsize=None)
def _kernels() -> tuple[torch.Tensor, torch.Tensor]:
    """Templates (2 sizes, 3 shapes, 4 phases, N, N) and windows (2 sizes, 4 phases, N, N).

    Centre pixel _R: a response at cell (i, j) is an object centred at (j + 0.5 + ox, i + 0.5 + oy).
    """
    c = _R + 0.5
    tmpl = [[[_coverage_grid(s, c + ox, c + oy, world.SIZES[z], _N) for ox, oy in PHASES] for s in world.SHAPES] for z in SIZE_NAMES]
    win = [[_coverage_grid("square", c + ox, c + oy, world.SIZES[z] + WINDOW_MARGIN, _N) for ox, oy in PHASES] for z in SIZE_NAMES]
    return torch.from_numpy(np.array(tmpl)), torch.from_numpy(np.array(win))


def _hue_vector(rgb: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hue as a point in the chroma plane (x, y): its angle is the hue, its length the chroma."""
    r, g, b = rgb.unbind(dim)
    return r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)


@lru_cache(maxsize=None)
def _palette_hues() -> torch.Tensor:
    """(6, 2) unit hue directions of the palette colours."""
    x, y = _hue_vector(torch.tensor(list(world.COLORS.values())), 1)
    v = torch.stack([x, y], 1)
    return v / v.norm(dim=1, keepdim=True)


def colour_masks(images: torch.Tensor) -> torch.Tensor:
    """(B, 7, H, W) soft memberships [background, *colours] by ShapeEval's rule, smooth so that the gradient is
    the value's own.

    A pixel belongs to colour c as far as its chroma projected on c's hue direction, relative to its
    brightness, passes ShapeEval's saturation threshold (a sigmoid, not a step), times its brightness passing
    MIN_VALUE, times a softmax over hue cosines (nearest palette hue).  The projection, unlike the saturation,
    is not flat at a grey pixel, so a blank canvas learns which way its requested colour lies.
    """
    mx = images.amax(1)
    x, y = _hue_vector(images, 1)
    hues = _palette_hues().to(images)
    proj = torch.einsum("bhw,c->bchw", x, hues[:, 0]) + torch.einsum("bhw,c->bchw", y, hues[:, 1])  # (B, 6, H, W)
    cos = proj / (x * x + y * y + 1e-6).sqrt()[:, None]
    bright = torch.sigmoid((mx - shapeeval.MIN_VALUE) / VALUE_SLOPE)
    each = torch.sigmoid((proj / mx.clamp_min(1e-3)[:, None] - shapeeval.MIN_SATURATION) / SAT_SLOPE) * bright[:, None] \
        * torch.softmax(HUE_SHARPNESS * cos, dim=1)
    return torch.cat([1 - each.sum(1, keepdim=True), each], 1)


@lru_cache(maxsize=None)
def _placement_prior(h: int, w: int) -> torch.Tensor:
    """(2 sizes, H, W): 0 where an object of that size centred at the cell fits the canvas, -inf elsewhere,
    minus the small centre tie-break."""
    out = []
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    centre = -CENTRE_PRIOR * ((ii + 0.75 - h / 2) ** 2 + (jj + 0.75 - w / 2) ** 2)
    for z in SIZE_NAMES:
        half = world.SIZES[z]
        fits = lambda v, n: (v + 0.5 - half >= 0) & (v + 1.0 + half <= n)  # noqa: E731  (both phases inside)
        out.append(centre.masked_fill(~(fits(ii, h) & fits(jj, w)), -math.inf))
    return torch.stack(out)


def _correlate(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Cross-correlation of images (M, H, W) with kernels (M or 1, K, n, n), zero-padded to the same size: (M, K, H, W).

    The same numbers as conv2d(padding=n // 2), by FFT in float64: n = 17 kernels make the direct convolution the
    reward's most expensive part (the layout search), and float64 keeps the argmax over placements the direct one's."""
    M, H, W = images.shape
    n = kernels.shape[-1]
    L = (H + n - 1, W + n - 1)
    spec = torch.fft.rfft2(F.pad(images.double(), (n // 2, n // 2, n // 2, n // 2)), s=L)[:, None]
    kspec = torch.fft.rfft2(kernels.double(), s=L).conj()
    return torch.fft.irfft2(spec * kspec, s=L)[..., :H, :W].to(images.dtype)


def _iou_maps(masks: torch.Tensor, shape_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft IoU of each mask's own shape template (masks (N, H, W), shape_idx (N,)) at every cell: (N, 2 sizes, H, W),
    best over phases, and that phase.  A mask meets only its own shape's templates."""
    tmpl, win = (k.to(masks) for k in _kernels())
    maps, phases = [], []
    for z in range(len(SIZE_NAMES)):
        mine = tmpl[z][shape_idx.to(masks.device)]  # (N, P, n, n)
        inter = _correlate(masks, mine)
        inside = _correlate(masks, win[z][None])
        area = mine.sum((2, 3))[..., None, None]
        m, ph = (inter / (area + inside - inter).clamp_min(1e-6)).max(1)
        maps.append(m)
        phases.append(ph)
    return torch.stack(maps, 1), torch.stack(phases, 1)


def _half_plane_best(m: torch.Tensor, gap: int, axis: int, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every cell p of m (B, H, W): the best value of m over cells q with sign * (q - p)[axis] >= gap, and its flat index.

    axis 0 = rows (y), 1 = columns (x).  -inf where no such q exists.
    """
    B, H, W = m.shape
    line, other = m.max(dim=2 - axis)  # reduce the other axis: (B, L) and the other coordinate of the best
    L = line.shape[1]
    if sign > 0:  # suffix maximum: best over positions >= t
        best, pos = torch.cummax(line.flip(1), dim=1)
        best, pos = best.flip(1), (L - 1 - pos).flip(1)
        shift = torch.arange(L) + gap
    else:  # prefix maximum: best over positions <= t
        best, pos = torch.cummax(line, dim=1)
        shift = torch.arange(L) - gap
    valid = (shift >= 0) & (shift < L)
    shift = shift.clamp(0, L - 1)
    val = best[:, shift].masked_fill(~valid, -math.inf)
    at = pos[:, shift]
    oth = other.gather(1, at)
    flat = at * W + oth if axis == 0 else oth * W + at
    if axis == 0:  # the value depends on p's row only
        return val[:, :, None].expand(B, H, W), flat[:, :, None].expand(B, H, W)
    return val[:, None, :].expand(B, H, W), flat[:, None, :].expand(B, H, W)


# (axis, sign) of where b must lie relative to a:  "a left of b" means b.x - a.x >= gap.
_DIRECTIONS = {"left": (1, 1), "right": (1, -1), "above": (0, 1), "below": (0, -1)}


def _best_pairs(a: torch.Tensor, b: torch.Tensor, relations: list[str | None]) -> torch.Tensor:
    """Best valid layout of two objects from their placement scores a, b (B, S, H, W): (B, 2, 2) of (size, cell).

    Valid: apart by half_a + half_b + 1 pixels along some axis (distinct components) and, where a relation is
    given, along its axis in its direction (the renderer's margin).  O(H W) per size pair, by prefix maxima.
    """
    B, S, H, W = a.shape
    best = torch.full((B,), -math.inf)
    out = torch.zeros(B, 2, 2, dtype=torch.long)
    allowed = torch.tensor([[rel is None or rel == d for d in _DIRECTIONS] for rel in relations])
    for sa, size_a in enumerate(SIZE_NAMES):
        for sb, size_b in enumerate(SIZE_NAMES):
            gap = math.ceil(world.SIZES[size_a] + world.SIZES[size_b] + 1.0)
            cand = [_half_plane_best(b[:, sb], gap, *ax) for ax in _DIRECTIONS.values()]
            vals = torch.stack([v for v, _ in cand], 1).masked_fill(~allowed[:, :, None, None], -math.inf)  # (B, 4, H, W)
            idxs = torch.stack([i for _, i in cand], 1)
            score, k = (a[:, sa, None] + vals).flatten(1).max(1)
            better = score > best
            best = torch.where(better, score, best)
            new = torch.stack([torch.stack([torch.full((B,), sa), k % (H * W)], 1),
                               torch.stack([torch.full((B,), sb), idxs.flatten(1).gather(1, k[:, None])[:, 0]], 1)], 1)
            out = torch.where(better[:, None, None], new, out)
    return out


class ShapeMatch(torch.nn.Module):
    """reward(images (B, 3, H, W) in [0, 1], ShapeWorld prompts) -> (B,), differentiable in the images.

    `terms` gives every part by name: iou, extra, mass, relation, fidelity (the module docstring says how they combine).
    """

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        t = self.terms(images, prompts)
        return (t["iou"] - EXTRA_WEIGHT * t["extra"] - SHAPING_WEIGHT * (t["mass"] + t["relation"])
                - FIDELITY_WEIGHT * t["fidelity"]).to(images.dtype)

    def terms(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapeMatch takes images (B, 3, H, W); got {tuple(images.shape)}")
        try:
            specs = [world.parse(p) for p in prompts]
        except ValueError as e:
            raise UserError(f"the shapematch reward reads ShapeWorld prompts only: {e}; use another reward.fn for other prompts") from None
        B, _, H, W = images.shape
        masks = colour_masks(images.float())
        objs = [(list(s.objects) * 2)[:2] for s in specs]  # one-object prompts: the second slot repeats the first, weight 0
        chan = torch.tensor([[1 + COLOUR_NAMES.index(o.color) if o.color else 0 for o in ob] for ob in objs])
        shape_idx = torch.tensor([[world.SHAPES.index(o.shape) for o in ob] for ob in objs])
        weight = torch.tensor([[1.0, float(len(s.objects) > 1)] for s in specs])
        with torch.no_grad():  # the layout: where each object is placed
            index = chan[:, :, None, None].expand(B, 2, H, W).to(masks.device)
            maps, phases = _object_maps(masks, index, shape_idx)
            excluded = torch.tensor([[[o.size is not None and o.size != z for z in SIZE_NAMES] for o in ob] for ob in objs])
            scores = (maps + _placement_prior(H, W)).masked_fill(excluded[..., None, None], -math.inf)
            layout = self._layout(scores, specs)
            size_i, cell = layout[..., 0], layout[..., 1]
            phase = phases.flatten(3).gather(2, size_i[..., None, None].expand(B, 2, 1, H * W))[:, :, 0].gather(2, cell[..., None])[..., 0]
        tmpl, win = _kernels()
        every = tmpl[size_i, :, phase].to(masks)  # (B, 2, 3 shapes, N, N): every shape's template at the chosen placement
        wn = win[size_i, phase].to(masks)
        iou_sc = _patch_iou(masks, cell, every, wn)  # (B, 2, 3, 7): per shape and colour
        own = shape_idx[..., None, None].to(masks.device)
        with torch.no_grad():  # a free colour: the best one
            mine = iou_sc.gather(2, own.expand(B, 2, 1, 7))[:, :, 0]
            colour = torch.where(chan.to(masks.device) > 0, chan.to(masks.device), 1 + mine[:, :, 1:].argmax(2))
        iou_s = iou_sc.gather(3, colour[..., None, None].expand(B, 2, 3, 1))[..., 0]  # (B, 2, 3) in the object's colour
        iou_own = iou_s.gather(2, own[..., 0])[..., 0]
        iou_other = iou_s.masked_fill(torch.nn.functional.one_hot(own[..., 0, 0], len(world.SHAPES)).bool(), -1.0).amax(2)
        iou_obj = iou_own - torch.relu(iou_other + SHAPE_MARGIN - iou_own)  # a shape ShapeEval could misread costs
        t = every.gather(2, own[..., None].expand(B, 2, 1, _N, _N))[:, :, 0]
        weight = weight.to(masks)
        iou = (iou_obj * weight).sum(1) / weight.sum(1)
        cover = _cover(t.detach(), cell, weight, H, W)
        area = _object_area(specs).to(masks)
        extra = ((1 - masks[:, 0]) * (1 - cover)).sum((1, 2)) / area / weight.sum(1)
        fidelity = _fidelity(images.float(), t.detach(), cell, colour, weight, cover)
        return {"iou": iou, "extra": extra, "mass": _mass_term(masks, specs) / area / weight.sum(1),
                "relation": _relation_term(masks, specs), "fidelity": fidelity}

    @staticmethod
    def _layout(scores: torch.Tensor, specs: list[world.PromptSpec]) -> torch.Tensor:
        """(B, 2, 2) long: (size index, flat cell) of each object in the best valid layout."""
        B, _, S, H, W = scores.shape
        out = torch.zeros(B, 2, 2, dtype=torch.long)
        single = [i for i, s in enumerate(specs) if len(s.objects) == 1]
        pair = [i for i, s in enumerate(specs) if len(s.objects) == 2]
        if single:
            k = scores[single, 0].flatten(1).argmax(1)
            out[single, 0, 0], out[single, 0, 1] = k // (H * W), k % (H * W)
            out[single, 1] = out[single, 0]
        if pair:
            out[pair] = _best_pairs(scores[pair, 0], scores[pair, 1], [specs[i].relation for i in pair])
        return out


def _fidelity(images: torch.Tensor, t: torch.Tensor, cell, colour: torch.Tensor, weight: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared RGB error of the objects' interiors to their palette colours plus that of the canvas outside
    the objects to the background: 0 on a truth render.  Pulls a hue ShapeEval could read as the neighbouring colour
    back to the palette's, and makes noise cost something everywhere."""
    palette = torch.tensor(list(world.COLORS.values()), device=images.device, dtype=images.dtype)[colour - 1]  # (B, 2, 3)
    # interiors eroded by a pixel: anti-aliased edges are mixtures by design, and the template sits up to a
    # quarter pixel off the object
    inner = -F.max_pool2d(-(t > 0.99).to(images.dtype).flatten(0, 1)[:, None], 3, 1, 1)[:, 0].view_as(t)
    err = ((_patches(images, cell) - palette[..., None, None]) ** 2).sum(2)
    objects = ((err * inner).sum((-1, -2)) / inner.sum((-1, -2)).clamp_min(1.0) * weight).sum(1) / weight.sum(1)
    bg = torch.tensor(world.BACKGROUND, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    outside = (1 - cover)
    canvas = (((images - bg) ** 2).sum(1) * outside).sum((1, 2)) / outside.sum((1, 2)).clamp_min(1.0)
    return objects + canvas


def _mass_term(masks: torch.Tensor, specs: list[world.PromptSpec]) -> torch.Tensor:
    """(B,) pixels by which each requested colour's total mass falls outside what its objects can cover.

    The range runs from MASS_RANGE[0] x the smallest to MASS_RANGE[1] x the largest allowed objects, so a truth
    render pays nothing; a missing or shrunken object pays with a gradient on every pixel (a blank canvas learns
    to draw the colour anywhere), a blob or a smear pays for its excess.
    """
    lo = torch.zeros(len(specs), 7)
    hi = torch.full((len(specs), 7), math.inf)
    for b, spec in enumerate(specs):
        for o in spec.objects:
            c = 1 + COLOUR_NAMES.index(o.color) if o.color else 0
            sizes = [_area(o.shape, o.size)] if o.size else [_area(o.shape, z) for z in SIZE_NAMES]
            lo[b, c] += MASS_RANGE[0] * min(sizes)
            hi[b, c] = (0.0 if math.isinf(hi[b, c]) else hi[b, c]) + MASS_RANGE[1] * max(sizes)
    lo, hi, mass = lo.to(masks), hi.to(masks), _any_colour_first(masks).sum((2, 3))
    return (torch.relu(lo - mass) + torch.relu(mass - hi).nan_to_num(0.0, posinf=0.0)).sum(1)


def _relation_term(masks: torch.Tensor, specs: list[world.PromptSpec]) -> torch.Tensor:
    """(B,) for `position` prompts whose two objects have different colours: how far (in canvas widths) the
    colour masses' centroids fall short of the relation by RELATION_MARGIN pixels.  Smooth in the layout, so it
    moves whole objects where the IoU term can only redraw them."""
    B, _, H, W = masks.shape
    out = torch.zeros(B, device=masks.device)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=masks.dtype, device=masks.device) + 0.5,
                            torch.arange(W, dtype=masks.dtype, device=masks.device) + 0.5, indexing="ij")
    for b, spec in enumerate(specs):
        if spec.relation is None or spec.objects[0].color == spec.objects[1].color:
            continue
        cents = []
        for o in spec.objects:
            m = masks[b, 1 + COLOUR_NAMES.index(o.color)]
            mass = m.sum().clamp_min(1.0)
            cents.append(((m * xs).sum() / mass, (m * ys).sum() / mass))
        (ax, ay), (bx, by) = cents
        along = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[spec.relation]
        out[b] = torch.relu(RELATION_MARGIN - along) / W
    return out


@lru_cache(maxsize=None)
def _area(shape: str, size: str) -> float:
    return float(_kernels()[0][SIZE_NAMES.index(size), world.SHAPES.index(shape), 0].sum())


def _object_area(specs: list[world.PromptSpec]) -> torch.Tensor:
    """(B,) the mean area of each prompt's objects (a free size: the mean of both): extra mass is counted in
    these units, so an extra object as big as a requested one costs what a requested one gains."""
    return torch.tensor([float(np.mean([_area(o.shape, o.size) if o.size else np.mean([_area(o.shape, z) for z in SIZE_NAMES])
                                        for o in s.objects])) for s in specs])


def _any_colour_first(masks: torch.Tensor) -> torch.Tensor:
    """The masks with channel 0 (background) replaced by its complement, "any colour": index 0 is a colour-free object."""
    return torch.cat([1 - masks[:, :1], masks[:, 1:]], 1)


def _object_maps(masks: torch.Tensor, index: torch.Tensor, shape_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU maps (B, 2, S, H, W) and phases of each object's shape over its colour's mask (index 0: any colour)."""
    B = masks.shape[0]
    obj_masks = _any_colour_first(masks).gather(1, index)
    maps, phases = _iou_maps(obj_masks.flatten(0, 1), shape_idx.flatten())
    return maps.unflatten(0, (B, 2)).float().cpu(), phases.unflatten(0, (B, 2)).cpu()


def _patch_iou(masks: torch.Tensor, cell, t: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
    """(B, 2, K, 7): IoU of the templates t (B, 2, K, N, N) at each object's cell with every colour channel."""
    patch = _patches(masks, cell)
    inter = torch.einsum("bocij,bokij->bokc", patch, t)
    inside = torch.einsum("bocij,boij->boc", patch, wn)[:, :, None]
    return inter / (t.sum((-1, -2))[..., None] + inside - inter).clamp_min(1e-6)


def _patches(masks: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """(B, 2, C, N, N): the N x N window of `masks` (B, C, H, W) centred on each object's cell (zero outside)."""
    B, C, H, W = masks.shape
    padded = F.pad(masks, (_R, _R, _R, _R))
    rows, cols = _window(cell, W, masks.device)
    bi = torch.arange(B, device=masks.device).view(B, 1, 1, 1, 1)
    ci = torch.arange(C, device=masks.device).view(1, 1, C, 1, 1)
    return padded[bi, ci, rows[:, :, None], cols[:, :, None]]


def _window(cell: torch.Tensor, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (B, 2, N, 1) and column (B, 2, 1, N) indices, in a canvas padded by _R, of the N x N window on each cell."""
    i, j = (cell // W).to(device), (cell % W).to(device)
    ar = torch.arange(_N, device=device)
    return (i[..., None] + ar)[..., :, None], (j[..., None] + ar)[..., None, :]


def _cover(t: torch.Tensor, cell: torch.Tensor, weight: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H, W) coverage of the chosen objects (templates t (B, 2, N, N) at their cells), dilated by one pixel."""
    B = t.shape[0]
    canvas = torch.zeros(B, 2, H + 2 * _R, W + 2 * _R, device=t.device)
    rows, cols = _window(cell, W, t.device)
    bi, oi = torch.arange(B, device=t.device).view(B, 1, 1, 1), torch.arange(2, device=t.device).view(1, 2, 1, 1)
    canvas[bi, oi, rows, cols] = t * (weight[..., None, None] > 0)
    cover = canvas[:, :, _R:_R + H, _R:_R + W].amax(1, keepdim=True)
    return F.max_pool2d(cover, 3, 1, 1)[:, 0]


def load_shapematch(path=None) -> ShapeMatch:
    """The built-in `shapematch` reward (analytic: `path` is not used)."""
    return ShapeMatch()

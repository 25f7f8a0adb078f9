"""The thin convolutions' Triton kernels: the gather convolution (`_gather_conv_kernel`: a thin
tensor gathered at 27 shifts against the packed weight, into the wide one), the weight gradient
(`_gather_weight_grad_kernel`), and a head's two-pass forward (`_tap_products_kernel`, then
`_tap_sum_kernel`). The names are those profiles show."""

from __future__ import annotations

from diffunet.accel.triton_runtime import tl, triton

if triton is not None:

    @triton.jit
    def _coordinates(ns, H, W):
        return ns // (W * H), ns // W % H, ns % W

    @triton.jit
    def _gathered_tile(
        t_ptr,
        ks,
        d_,
        h_,
        w_,
        inside_n,
        D,
        H,
        W,
        stc,
        std,
        sth,
        stw,
        CT: tl.constexpr,
        MIRRORED: tl.constexpr,
    ):
        """The (positions × ks) tile of one sample `t_ptr` of the thin tensor: element (n, k)
        is channel k % CT at position n shifted by tap k // CT (by the opposite shift when
        MIRRORED), zero outside the volume (the zero padding) and beyond the 27 × CT rows."""
        tap = ks // CT
        od = tap // 9 - 1
        oh = tap // 3 % 3 - 1
        ow = tap % 3 - 1
        if MIRRORED:
            od, oh, ow = -od, -oh, -ow
        sd = d_[:, None] + od[None, :]
        sh = h_[:, None] + oh[None, :]
        sw = w_[:, None] + ow[None, :]
        inside = (
            inside_n[:, None]
            & (ks < 27 * CT)[None, :]
            & (sd >= 0)
            & (sd < D)
            & (sh >= 0)
            & (sh < H)
            & (sw >= 0)
            & (sw < W)
        )
        offsets = (d_ * std + h_ * sth + w_ * stw)[:, None] + (
            od * std + oh * sth + ow * stw + ks % CT * stc
        )[None, :]
        return tl.load(t_ptr + offsets, mask=inside, other=0.0)

    @triton.jit
    def _gather_conv_kernel(
        t_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        D,
        H,
        W,
        stb,
        stc,
        std,
        sth,
        stw,
        syb,
        syc,
        syd,
        syh,
        syw,
        CT: tl.constexpr,
        CW: tl.constexpr,
        MIRRORED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_CW: tl.constexpr,
    ):
        b = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        d_, h_, w_ = _coordinates(ns, H, W)
        cw = tl.arange(0, BLOCK_CW)
        acc = tl.zeros([BLOCK_N, BLOCK_CW], dtype=tl.float32)
        for k0 in tl.static_range(0, 27 * CT, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = _gathered_tile(
                t_ptr + b * stb, ks, d_, h_, w_, inside_n, D, H, W, stc, std, sth, stw, CT, MIRRORED
            )
            w = tl.load(w_ptr + ks[:, None] * BLOCK_CW + cw[None, :])
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cw, mask=cw < CW, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + b * syb + (d_ * syd + h_ * syh + w_ * syw)[:, None] + cw[None, :] * syc,
            acc.to(y_ptr.dtype.element_ty),
            mask=inside_n[:, None] & (cw < CW)[None, :],
        )

    @triton.jit
    def _gather_weight_grad_kernel(
        t_ptr,
        u_ptr,
        part_ptr,
        wide_sum_ptr,
        D,
        H,
        W,
        rows,
        chunks,
        stb,
        stc,
        std,
        sth,
        stw,
        sub,
        suc,
        sud,
        suh,
        suw,
        CT: tl.constexpr,
        CW: tl.constexpr,
        MIRRORED: tl.constexpr,
        SUM_WIDE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_CW: tl.constexpr,
    ):
        kc = tl.program_id(0)
        run = tl.program_id(1)
        b = (run // chunks).to(tl.int64)
        start = (run % chunks) * rows
        ks = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        cw = tl.arange(0, BLOCK_CW)
        acc = tl.zeros([BLOCK_K, BLOCK_CW], dtype=tl.float32)
        wide_sum = tl.zeros([BLOCK_CW], dtype=tl.float32)
        for offset in range(0, rows, BLOCK_N):
            ns = start + offset + tl.arange(0, BLOCK_N)
            inside_n = ns < D * H * W
            d_, h_, w_ = _coordinates(ns, H, W)
            a = _gathered_tile(
                t_ptr + b * stb, ks, d_, h_, w_, inside_n, D, H, W, stc, std, sth, stw, CT, MIRRORED
            )
            u = tl.load(
                u_ptr + b * sub + (d_ * sud + h_ * suh + w_ * suw)[:, None] + cw[None, :] * suc,
                mask=inside_n[:, None] & (cw < CW)[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(a), u, acc, input_precision=PRECISION)
            if SUM_WIDE:
                wide_sum += tl.sum(u.to(tl.float32), axis=0)
        k_padded = tl.num_programs(0) * BLOCK_K
        tl.store(part_ptr + run * k_padded * BLOCK_CW + ks[:, None] * BLOCK_CW + cw[None, :], acc)
        if SUM_WIDE:  # noqa: SIM102  (a compile-time branch around a run-time one)
            if kc == 0:
                tl.store(wide_sum_ptr + run * BLOCK_CW + cw, wide_sum)

    @triton.jit
    def _tap_products_kernel(
        x_ptr,
        w_ptr,
        z_ptr,
        D,
        H,
        W,
        first,
        sxb,
        sxc,
        sxd,
        sxh,
        sxw,
        CIN: tl.constexpr,
        K: tl.constexpr,
        K_PADDED: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_CI: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """z[s, n, k] = Σ_ci x[first + s, ci, n] · w[ci, k]: each position's products with the
        K = 27 × COUT tap weights (column tap * COUT + co), from one read of x."""
        s = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        d_, h_, w_ = _coordinates(ns, H, W)
        ci = tl.arange(0, BLOCK_CI)
        x = tl.load(
            x_ptr
            + (first + s) * sxb
            + (d_ * sxd + h_ * sxh + w_ * sxw)[:, None]
            + ci[None, :] * sxc,
            mask=inside_n[:, None] & (ci < CIN)[None, :],
            other=0.0,
        )
        rows = (s * D * H * W + ns)[:, None] * K
        for k0 in tl.static_range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + ci[:, None] * K_PADDED + ks[None, :])
            z = tl.dot(x, w, input_precision=PRECISION)
            tl.store(
                z_ptr + rows + ks[None, :],
                z.to(z_ptr.dtype.element_ty),
                mask=inside_n[:, None] & (ks < K)[None, :],
            )

    @triton.jit
    def _tap_sum_kernel(
        z_ptr,
        b_ptr,
        y_ptr,
        D,
        H,
        W,
        first,
        syb,
        syc,
        syd,
        syh,
        syw,
        COUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """y[first + s, co, n] = Σ_tap z[s, n + offset(tap), tap * COUT + co] (+ bias[co])."""
        s = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        d_, h_, w_ = _coordinates(ns, H, W)
        tap = tl.arange(0, 32)
        sd = d_[:, None] + (tap // 9 - 1)[None, :]
        sh = h_[:, None] + (tap // 3 % 3 - 1)[None, :]
        sw = w_[:, None] + (tap % 3 - 1)[None, :]
        inside = (
            inside_n[:, None]
            & (tap < 27)[None, :]
            & (sd >= 0)
            & (sd < D)
            & (sh >= 0)
            & (sh < H)
            & (sw >= 0)
            & (sw < W)
        )
        rows = (s * D * H * W + (sd * H + sh) * W + sw) * (27 * COUT)
        out = y_ptr + (first + s) * syb + d_ * syd + h_ * syh + w_ * syw
        for co in tl.static_range(COUT):
            z = tl.load(z_ptr + rows + (tap * COUT + co)[None, :], mask=inside, other=0.0)
            y = tl.sum(z.to(tl.float32), axis=1)
            if HAS_BIAS:
                y += tl.load(b_ptr + co).to(tl.float32)
            tl.store(out + co * syc, y.to(y_ptr.dtype.element_ty), mask=inside_n)

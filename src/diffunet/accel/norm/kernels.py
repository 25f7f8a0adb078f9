"""The norm's Triton kernels. x is viewed as (B, C, N) with arbitrary strides,
N = prod(spatial), so one kernel serves NCHW and channels-last in 1D, 2D and 3D. Grid: (B,
chunks of N) for the streaming kernels, (B, slices of groups) for the one-kernel ones.

Forward: statistics per chunk (`_stats_kernel`), their combination per group
(`_stats_combine_kernel`), the normalization (`_normalize_kernel`); backward: the per-chunk
reductions (`_backward_reduce_kernel`), their combination (`_backward_combine_kernel`), the
input gradient (`_backward_dx_kernel`). Small calls run each direction as one kernel
(`_one_pass_kernel`, `_one_pass_backward_kernel`). The names are those profiles show.
"""

from __future__ import annotations

from diffunet.accel.triton_runtime import tl, triton

if triton is not None:

    @triton.jit
    def _shifted_sums(
        base,
        k,
        start,
        rows,
        N,
        cs,
        cmask,
        sxc,
        sxn,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Per channel, Σ (x - k) and Σ (x - k)² over positions [start, start + rows) of the
        sample at `base`."""
        acc1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            v = tl.load(base + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0)
            d = tl.where(mask, v.to(tl.float32) - k[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)

    @triton.jit
    def _normalize_rows(
        base,
        y_base,
        start,
        rows,
        N,
        cs,
        cmask,
        sxc,
        sxn,
        syc,
        syn,
        gain,
        offset_c,
        ACT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Writes x * gain + offset (through the SiLU where `ACT`) at positions
        [start, start + rows) of one sample."""
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            v = tl.load(base + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0)
            h = v.to(tl.float32) * gain[None, :] + offset_c[None, :]
            if ACT:
                h = h * tl.sigmoid(h)
            tl.store(
                y_base + ns[:, None] * syn + cs[None, :] * syc,
                h.to(y_base.dtype.element_ty),
                mask=mask,
            )

    @triton.jit
    def _group_indicator(js, per_group, cmask, BLOCK_G: tl.constexpr):
        """Which of a slice's groups each of its channels `js` belongs to: a (channel, group)
        mask, false for channels outside the tensor."""
        return (js[:, None] // per_group == tl.arange(0, BLOCK_G)[None, :]) & cmask[:, None]

    @triton.jit
    def _group_sums(values, member):
        """Per channel, the sum of the per-channel `values` over the channel's group."""
        per_group = tl.sum(tl.where(member, values[:, None], 0.0), axis=0)
        return tl.sum(tl.where(member, per_group[None, :], 0.0), axis=1)

    @triton.jit
    def _stats_kernel(
        x_ptr,
        s1_ptr,
        s2_ptr,
        shift_ptr,
        C,
        N,
        rows,
        sxb,
        sxc,
        sxn,
        num_chunks,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        base = x_ptr + b * sxb
        # Shift by the first position's value per channel: sums of (x - K) stay well conditioned.
        k = tl.load(base + cs * sxc, mask=cmask, other=0.0).to(tl.float32)
        s1, s2 = _shifted_sums(
            base, k, chunk * rows, rows, N, cs, cmask, sxc, sxn, BLOCK_C, BLOCK_N, STAGES
        )
        out = (b * num_chunks + chunk) * C + cs
        tl.store(s1_ptr + out, s1, mask=cmask)
        tl.store(s2_ptr + out, s2, mask=cmask)
        if chunk == 0:
            tl.store(shift_ptr + b * C + cs, k, mask=cmask)

    @triton.jit
    def _chunk_sums(
        first_ptr,
        second_ptr,
        b,
        num_chunks,
        C,
        cs,
        cmask,
        BLOCK_K: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Sample `b`'s per-chunk partials of two (B, chunks, C) buffers summed over the chunks
        at channels `cs`, `BLOCK_K` chunks per load: one wide load, not one load per chunk."""
        ks = tl.arange(0, BLOCK_K)
        first = tl.zeros([BLOCK_G], dtype=tl.float32)
        second = tl.zeros([BLOCK_G], dtype=tl.float32)
        for k0 in range(0, num_chunks, BLOCK_K):
            rows = b * num_chunks + k0 + ks
            offsets = rows[:, None] * C + cs[None, :]
            mask = ((k0 + ks) < num_chunks)[:, None] & cmask[None, :]
            first += tl.sum(tl.load(first_ptr + offsets, mask=mask, other=0.0), axis=0)
            second += tl.sum(tl.load(second_ptr + offsets, mask=mask, other=0.0), axis=0)
        return first, second

    @triton.jit
    def _stats_combine_kernel(
        s1_ptr,
        s2_ptr,
        shift_ptr,
        add_ptr,
        mean_ptr,
        rstd_ptr,
        C,
        N,
        num_chunks,
        per_group,
        eps,
        ADD: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        cs = g * per_group + tl.arange(0, BLOCK_G)
        cmask = tl.arange(0, BLOCK_G) < per_group
        s1, s2 = _chunk_sums(s1_ptr, s2_ptr, b, num_chunks, C, cs, cmask, BLOCK_K, BLOCK_G)
        k = tl.load(shift_ptr + b * C + cs, mask=cmask, other=0.0)
        channel_mean = k + s1 / N
        if ADD:
            added = tl.load(add_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            channel_mean += added
        channel_m2 = tl.maximum(s2 - s1 * s1 / N, 0.0)
        group_mean = tl.sum(tl.where(cmask, channel_mean, 0.0), axis=0) / per_group
        spread = tl.where(cmask, channel_mean - group_mean, 0.0)
        group_m2 = tl.sum(tl.where(cmask, channel_m2, 0.0), axis=0) + N * tl.sum(
            spread * spread, axis=0
        )
        rstd = 1.0 / tl.sqrt(group_m2 / (N * per_group) + eps)
        # The stored "mean" is the centre of x itself: x - (mean - add) == (x + add) - mean.
        centre = tl.zeros([BLOCK_G], dtype=tl.float32) + group_mean
        if ADD:
            centre -= added
        tl.store(mean_ptr + b * C + cs, centre, mask=cmask)
        tl.store(rstd_ptr + b * C + cs, tl.zeros([BLOCK_G], dtype=tl.float32) + rstd, mask=cmask)

    @triton.jit
    def _store_rounded(ptr, value, mask):
        """Stores float32 `value` in `ptr`'s element type, rounded to nearest even as `Tensor.to`
        rounds (bf16 by hand: Triton's interpreter truncates it)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            value = bits.to(tl.float32, bitcast=True)
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_combine_kernel(
        a_ptr,
        b_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        a_full_ptr,
        b_full_ptr,
        ds_ptr,
        dsh_ptr,
        c1_ptr,
        c2_ptr,
        C,
        N,
        num_chunks,
        per_group,
        FILM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        cs = g * per_group + tl.arange(0, BLOCK_G)
        cmask = tl.arange(0, BLOCK_G) < per_group
        a_sum, b_sum = _chunk_sums(a_ptr, b_ptr, b, num_chunks, C, cs, cmask, BLOCK_K, BLOCK_G)
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        a_full = a_sum
        b_full = b_sum
        if FILM:
            s = 1.0 + tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            a_full = a_sum * s
            b_full = b_sum * s
            bb = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
            _store_rounded(ds_ptr + b * C + cs, w * a_sum + bb * b_sum, cmask)
            _store_rounded(dsh_ptr + b * C + cs, b_sum, cmask)
        tl.store(a_full_ptr + b * C + cs, a_full, mask=cmask)
        tl.store(b_full_ptr + b * C + cs, b_full, mask=cmask)
        count = N * per_group
        c1 = tl.sum(tl.where(cmask, w * b_full, 0.0), axis=0) / count
        c2 = tl.sum(tl.where(cmask, w * a_full, 0.0), axis=0) / count
        tl.store(c1_ptr + b * C + cs, tl.zeros([BLOCK_G], dtype=tl.float32) + c1, mask=cmask)
        tl.store(c2_ptr + b * C + cs, tl.zeros([BLOCK_G], dtype=tl.float32) + c2, mask=cmask)

    @triton.jit
    def _channel_affine(
        w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, centre, rstd, FILM: tl.constexpr
    ):
        """Per channel, the gain and offset that map x to the normalized, affine (and FiLM)
        output: y = x * gain + offset."""
        gain = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) * rstd
        offset = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32) - centre * gain
        if FILM:
            s = 1.0 + tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            gain = gain * s
            offset = offset * s + tl.load(sh_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
        return gain, offset

    @triton.jit
    def _normalize_kernel(
        x_ptr,
        y_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        C,
        N,
        rows,
        sxb,
        sxc,
        sxn,
        syb,
        syc,
        syn,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean = tl.load(mean_ptr + b * C + cs, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + cs, mask=cmask, other=0.0)
        gain, offset_c = _channel_affine(
            w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, mean, rstd, FILM
        )
        _normalize_rows(
            x_ptr + b * sxb,
            y_ptr + b * syb,
            chunk * rows,
            rows,
            N,
            cs,
            cmask,
            sxc,
            sxn,
            syc,
            syn,
            gain,
            offset_c,
            ACT,
            BLOCK_N,
            STAGES,
        )

    @triton.jit
    def _one_pass_kernel(
        x_ptr,
        y_ptr,
        add_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        C,
        N,
        per_group,
        slice_channels,
        eps,
        sxb,
        sxc,
        sxn,
        syb,
        syc,
        syn,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        STAGES: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        # _stats_kernel, _stats_combine_kernel and _normalize_kernel for one sample's slice of
        # whole groups; the second pass reads x back, mostly from L2, unless all its positions
        # fit one tile (SINGLE_TILE), which stays in registers.
        b = tl.program_id(0)
        js = tl.arange(0, BLOCK_C)
        cs = tl.program_id(1) * slice_channels + js
        cmask = (js < slice_channels) & (cs < C)
        base = x_ptr + b * sxb
        k = tl.load(base + cs * sxc, mask=cmask, other=0.0).to(tl.float32)
        if SINGLE_TILE:
            ns = tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            v = tl.load(base + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0).to(
                tl.float32
            )
            d = tl.where(mask, v - k[None, :], 0.0)
            s1 = tl.sum(d, axis=0)
            s2 = tl.sum(d * d, axis=0)
        else:
            s1, s2 = _shifted_sums(base, k, 0, N, N, cs, cmask, sxc, sxn, BLOCK_C, BLOCK_N, STAGES)
        channel_mean = k + s1 / N
        if ADD:
            added = tl.load(add_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            channel_mean += added
        channel_m2 = tl.maximum(s2 - s1 * s1 / N, 0.0)
        member = _group_indicator(js, per_group, cmask, BLOCK_G)
        centre = _group_sums(channel_mean, member) / per_group
        spread = tl.where(cmask, channel_mean - centre, 0.0)
        group_m2 = _group_sums(channel_m2 + N * spread * spread, member)
        rstd = 1.0 / tl.sqrt(group_m2 / (N * per_group) + eps)
        if ADD:  # the stored centre is that of x itself, as _stats_combine_kernel's
            centre -= added
        tl.store(mean_ptr + b * C + cs, centre, mask=cmask)
        tl.store(rstd_ptr + b * C + cs, rstd, mask=cmask)
        gain, offset_c = _channel_affine(
            w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, centre, rstd, FILM
        )
        if SINGLE_TILE:
            h = v * gain[None, :] + offset_c[None, :]
            if ACT:
                h = h * tl.sigmoid(h)
            tl.store(
                y_ptr + b * syb + ns[:, None] * syn + cs[None, :] * syc,
                h.to(y_ptr.dtype.element_ty),
                mask=mask,
            )
        else:
            _normalize_rows(
                base,
                y_ptr + b * syb,
                0,
                N,
                N,
                cs,
                cmask,
                sxc,
                sxn,
                syc,
                syn,
                gain,
                offset_c,
                ACT,
                BLOCK_N,
                STAGES,
            )

    @triton.jit
    def _channel_operands(
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        b,
        C,
        cs,
        cmask,
        BLOCK_C: tl.constexpr,
        FILM: tl.constexpr,
    ):
        """Per channel of sample b, in float32: the forward's centre and rstd, the affine
        weight and bias, and the FiLM factor (1 + scale) and shift (1 and 0 without FiLM)."""
        centre = tl.load(mean_ptr + b * C + cs, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + cs, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        s = tl.full([BLOCK_C], 1.0, tl.float32)
        sh = tl.zeros([BLOCK_C], dtype=tl.float32)
        if FILM:
            s += tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            sh = tl.load(sh_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
        return centre, rstd, w, bb, s, sh

    @triton.jit
    def _tile_gradient(
        x_ptr,
        dy_ptr,
        b,
        ns,
        cs,
        mask,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        centre,
        rstd,
        w,
        bb,
        s,
        sh,
        ACT: tl.constexpr,
    ):
        """One tile's normalized input x̂ and the gradient that reaches the norm's affine
        output (through the SiLU where `ACT`), in float32."""
        v = tl.load(
            x_ptr + b * sxb + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0
        ).to(tl.float32)
        g = tl.load(
            dy_ptr + b * sdb + ns[:, None] * sdn + cs[None, :] * sdc, mask=mask, other=0.0
        ).to(tl.float32)
        xhat = (v - centre[None, :]) * rstd[None, :]
        if ACT:
            z = (xhat * w[None, :] + bb[None, :]) * s[None, :] + sh[None, :]
            sig = tl.sigmoid(z)
            g = g * sig * (1.0 + z * (1.0 - sig))
        return xhat, g

    @triton.jit
    def _gradient_sums(
        x_ptr,
        dy_ptr,
        b,
        start,
        rows,
        N,
        cs,
        cmask,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        centre,
        rstd,
        w,
        bb,
        s,
        sh,
        ACT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Per channel, Σ g·x̂ and Σ g over positions [start, start + rows) of one sample, g
        being the gradient at the norm's affine output (`_tile_gradient`)."""
        acc_a = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            xhat, g = _tile_gradient(
                x_ptr,
                dy_ptr,
                b,
                ns,
                cs,
                mask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
            )
            g = tl.where(mask, g, 0.0)
            acc_a += g * xhat
            acc_b += g
        return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)

    @triton.jit
    def _input_gradient(
        x_ptr,
        dy_ptr,
        dx_ptr,
        b,
        start,
        rows,
        N,
        cs,
        cmask,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        sob,
        soc,
        son,
        centre,
        rstd,
        w,
        bb,
        s,
        sh,
        c1,
        c2,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Writes dx at positions [start, start + rows) of one sample, from the group means
        c1 = mean(dx̂) and c2 = mean(dx̂·x̂); returns its sum per channel where `ADD` (the
        gradient of `add`), else zeros."""
        acc_dx = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            xhat, g = _tile_gradient(
                x_ptr,
                dy_ptr,
                b,
                ns,
                cs,
                mask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
            )
            dxhat = g * (s * w)[None, :]
            dx = rstd[None, :] * (dxhat - c1[None, :] - xhat * c2[None, :])
            tl.store(
                dx_ptr + b * sob + ns[:, None] * son + cs[None, :] * soc,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
            if ADD:
                acc_dx += tl.where(mask, dx, 0.0)
        return tl.sum(acc_dx, axis=0)

    @triton.jit
    def _backward_reduce_kernel(
        x_ptr,
        dy_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        a_ptr,
        b_ptr,
        C,
        N,
        rows,
        num_chunks,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, rstd, w, bb, s, sh = _channel_operands(
            mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, BLOCK_C, FILM
        )
        a_sum, b_sum = _gradient_sums(
            x_ptr,
            dy_ptr,
            b,
            chunk * rows,
            rows,
            N,
            cs,
            cmask,
            sxb,
            sxc,
            sxn,
            sdb,
            sdc,
            sdn,
            mean,
            rstd,
            w,
            bb,
            s,
            sh,
            ACT,
            BLOCK_C,
            BLOCK_N,
            STAGES,
        )
        out = (b * num_chunks + chunk) * C + cs
        tl.store(a_ptr + out, a_sum, mask=cmask)
        tl.store(b_ptr + out, b_sum, mask=cmask)

    @triton.jit
    def _backward_dx_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        c1_ptr,
        c2_ptr,
        dadd_ptr,
        C,
        N,
        rows,
        num_chunks,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        sob,
        soc,
        son,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, rstd, w, bb, s, sh = _channel_operands(
            mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, BLOCK_C, FILM
        )
        c1 = tl.load(c1_ptr + b * C + cs, mask=cmask, other=0.0)
        c2 = tl.load(c2_ptr + b * C + cs, mask=cmask, other=0.0)
        dx_sum = _input_gradient(
            x_ptr,
            dy_ptr,
            dx_ptr,
            b,
            chunk * rows,
            rows,
            N,
            cs,
            cmask,
            sxb,
            sxc,
            sxn,
            sdb,
            sdc,
            sdn,
            sob,
            soc,
            son,
            mean,
            rstd,
            w,
            bb,
            s,
            sh,
            c1,
            c2,
            ACT,
            ADD,
            BLOCK_C,
            BLOCK_N,
            STAGES,
        )
        if ADD:  # the gradient of `add` is the input gradient summed over positions
            tl.store(dadd_ptr + (b * num_chunks + chunk) * C + cs, dx_sum, mask=cmask)

    @triton.jit
    def _one_pass_backward_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        a_full_ptr,
        b_full_ptr,
        ds_ptr,
        dsh_ptr,
        dadd_ptr,
        C,
        N,
        per_group,
        slice_channels,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        sob,
        soc,
        son,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        STAGES: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        # _backward_reduce_kernel, _backward_combine_kernel and _backward_dx_kernel for one
        # sample's slice of whole groups; the second pass reads x and dy back, mostly from L2,
        # unless all its positions fit one tile (SINGLE_TILE), which stays in registers.
        b = tl.program_id(0)
        js = tl.arange(0, BLOCK_C)
        cs = tl.program_id(1) * slice_channels + js
        cmask = (js < slice_channels) & (cs < C)
        centre, rstd, w, bb, s, sh = _channel_operands(
            mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, BLOCK_C, FILM
        )
        if SINGLE_TILE:
            ns = tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            xhat, g = _tile_gradient(
                x_ptr,
                dy_ptr,
                b,
                ns,
                cs,
                mask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
            )
            g = tl.where(mask, g, 0.0)
            a_sum = tl.sum(g * xhat, axis=0)
            b_sum = tl.sum(g, axis=0)
        else:
            a_sum, b_sum = _gradient_sums(
                x_ptr,
                dy_ptr,
                b,
                0,
                N,
                N,
                cs,
                cmask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
                BLOCK_C,
                BLOCK_N,
                STAGES,
            )
        if FILM:
            _store_rounded(ds_ptr + b * C + cs, w * a_sum + bb * b_sum, cmask)
            _store_rounded(dsh_ptr + b * C + cs, b_sum, cmask)
        a_full = a_sum * s
        b_full = b_sum * s
        tl.store(a_full_ptr + b * C + cs, a_full, mask=cmask)
        tl.store(b_full_ptr + b * C + cs, b_full, mask=cmask)
        member = _group_indicator(js, per_group, cmask, BLOCK_G)
        c1 = _group_sums(w * b_full, member) / (N * per_group)
        c2 = _group_sums(w * a_full, member) / (N * per_group)
        if SINGLE_TILE:
            dx = rstd[None, :] * (g * (s * w)[None, :] - c1[None, :] - xhat * c2[None, :])
            tl.store(
                dx_ptr + b * sob + ns[:, None] * son + cs[None, :] * soc,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
            dx_sum = tl.sum(tl.where(mask, dx, 0.0), axis=0)
        else:
            dx_sum = _input_gradient(
                x_ptr,
                dy_ptr,
                dx_ptr,
                b,
                0,
                N,
                N,
                cs,
                cmask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                sob,
                soc,
                son,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                c1,
                c2,
                ACT,
                ADD,
                BLOCK_C,
                BLOCK_N,
                STAGES,
            )
        if ADD:
            _store_rounded(dadd_ptr + b * C + cs, dx_sum, cmask)

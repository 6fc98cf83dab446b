#include <torch/extension.h>
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The one-node block step's aten work (casts, GEMMs, allocations of every kernel output, views),
// with no kernel launched: the floor of a C++ orchestration, for measurement only.
struct BlockFloor : public torch::autograd::Function<BlockFloor> {
  static variable_list forward(AutogradContext* ctx, Tensor branch, Tensor residual, int64_t H, Tensor n1w,
                               Tensor n1b, Tensor qkvw, Tensor qkvb, Tensor projw, Tensor projb, Tensor n2w,
                               Tensor n2b, Tensor fc1w, Tensor fc1b, Tensor fc2w, Tensor fc2b) {
    auto B = branch.size(0), N = branch.size(1), D = branch.size(2), d = D / H, rows = B * N;
    auto ct = at::kBFloat16;
    auto f32 = branch.options().dtype(at::kFloat);
    Tensor y1 = at::empty_like(branch, at::MemoryFormat::Contiguous);
    Tensor h1 = at::empty_like(branch, f32, at::MemoryFormat::Contiguous);
    Tensor mean1 = at::empty({rows}, f32), rstd1 = at::empty({rows}, f32);
    Tensor qkvwc = qkvw.to(ct), qkvbc = qkvb.to(ct);
    Tensor qkv = at::linear(y1, qkvwc, qkvbc);
    auto parts = qkv.view({B, N, 3, H, d}).unbind(2);
    Tensor out = at::empty({B, N, H, d}, branch.options().dtype(ct));
    Tensor lse = at::empty({B, H, N}, f32);
    Tensor attn = out.view({B, N, D});
    Tensor projwc = projw.to(ct), projbc = projb.to(ct);
    Tensor proj = at::linear(attn, projwc, projbc);
    Tensor y2 = at::empty_like(proj, at::MemoryFormat::Contiguous);
    Tensor h2 = at::empty_like(proj, f32, at::MemoryFormat::Contiguous);
    Tensor mean2 = at::empty({rows}, f32), rstd2 = at::empty({rows}, f32);
    Tensor fc1wc = fc1w.to(ct);
    Tensor hidden = at::linear(y2, fc1wc);
    Tensor g = at::empty_like(hidden, at::MemoryFormat::Contiguous);
    Tensor fc2wc = fc2w.to(ct).contiguous(), fc2bc = fc2b.to(ct);
    Tensor o = at::linear(g, fc2wc, fc2bc);
    ctx->save_for_backward({branch, h1, n1w, n1b, mean1, rstd1, y1, qkvwc, parts[0], parts[1], parts[2], out, lse,
                            attn, projwc, h2, n2w, n2b, mean2, rstd2, y2, fc1wc, hidden, fc1b, fc2wc});
    ctx->saved_data["H"] = H;
    return {o, h2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    int64_t H = ctx->saved_data["H"].toInt();
    Tensor dout = grads[0];
    Tensor y1 = s[6], qkvwc = s[7], q = s[8], lse = s[12], attn = s[13], projwc = s[14], y2 = s[20], fc1wc = s[21],
           hidden = s[22], fc1b = s[23], fc2wc = s[24];
    auto B = dout.size(0), N = dout.size(1), D = dout.size(2), d = D / H;
    auto f32 = dout.options().dtype(at::kFloat);
    int64_t P = 8;  // partial rows of the LayerNorm backward's parameter sums
    Tensor dout2 = dout.reshape({-1, D});
    Tensor hid2 = hidden.reshape({-1, hidden.size(-1)});
    Tensor ybuf = at::empty(hid2.sizes(), hid2.options());
    Tensor dz = dout2.mm(fc2wc);
    Tensor bias_sum = at::empty({hidden.size(-1)}, f32);
    Tensor d_fc2w = dout2.t().mm(ybuf).to(at::kFloat);
    Tensor d_fc2b = dout2.sum(0, false, at::kFloat);
    Tensor dy2 = dz.mm(fc1wc).view({B, N, D});
    Tensor d_fc1w = dz.t().mm(y2.reshape({-1, D})).to(at::kFloat);
    Tensor dproj = at::empty_like(dy2, at::MemoryFormat::Contiguous);
    Tensor dres2 = at::empty_like(dy2, f32, at::MemoryFormat::Contiguous);
    auto pg2 = at::empty({2, P, D}, f32).sum(1).unbind(0);
    Tensor dp2 = dproj.reshape({-1, D});
    Tensor dattn = dp2.mm(projwc);
    Tensor d_projw = dp2.t().mm(attn.reshape({-1, D})).to(at::kFloat);
    Tensor d_projb = dp2.sum(0).to(at::kFloat);
    Tensor dqkv = at::empty({B, N, 3, H, d}, q.options());
    auto dparts = dqkv.unbind(2);
    Tensor delta = at::empty_like(lse);
    Tensor dq2 = dqkv.view({B * N, 3 * D});
    Tensor dy1 = dq2.mm(qkvwc);
    Tensor d_qkvw = dq2.t().mm(y1.reshape({-1, D})).to(at::kFloat);
    Tensor d_qkvb = dq2.sum(0).to(at::kFloat);
    Tensor dbranch = at::empty_like(dy1.view({B, N, D}), at::MemoryFormat::Contiguous);
    Tensor dres1 = at::empty_like(dbranch, f32, at::MemoryFormat::Contiguous);
    auto pg1 = at::empty({2, P, D}, f32).sum(1).unbind(0);
    return {dbranch, dres1, Tensor(), pg1[0], pg1[1], d_qkvw, d_qkvb, d_projw, d_projb, pg2[0], pg2[1],
            d_fc1w, bias_sum, d_fc2w, d_fc2b};
  }
};

std::vector<Tensor> block_floor(Tensor branch, Tensor residual, int64_t H, Tensor n1w, Tensor n1b, Tensor qkvw,
                                Tensor qkvb, Tensor projw, Tensor projb, Tensor n2w, Tensor n2b, Tensor fc1w,
                                Tensor fc1b, Tensor fc2w, Tensor fc2b) {
  return BlockFloor::apply(branch, residual, H, n1w, n1b, qkvw, qkvb, projw, projb, n2w, n2b, fc1w, fc1b, fc2w, fc2b);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("block_floor", &block_floor); }

// The activations a layer applies to its product, as candle_nn's `Activation` defines them
// (PyTorch's): prepended to the kernels that take an `act` code.

const ACT_NONE: u32 = 0u;
const ACT_GELU_TANH: u32 = 1u;
const ACT_GELU_ERF: u32 = 2u;
const ACT_SILU: u32 = 3u;
const ACT_RELU: u32 = 4u;
const ACT_SIGMOID: u32 = 5u;

fn sigmoid(x: f32) -> f32 {
  // exp of a large positive argument overflows to inf, and 1 / inf is the 0 wanted.
  return 1.0 / (1.0 + exp(-x));
}

// tanh(u) as 1 − 2 / (e^{2u} + 1): no inf / inf past |u| ≈ 44, where tanh's own formula may
// give NaN on some implementations.
fn tanh_safe(u: f32) -> f32 {
  let e = exp(2.0 * clamp(u, -20.0, 20.0));
  return 1.0 - 2.0 / (e + 1.0);
}

// erf by Abramowitz & Stegun 7.1.26 refined (|error| < 1.2e-7): WGSL has no erf.
fn erf_approx(x: f32) -> f32 {
  let z = abs(x);
  let t = 1.0 / (1.0 + 0.5 * z);
  let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
  return select(1.0 - r, r - 1.0, x < 0.0);
}

fn activate(x: f32, act: u32) -> f32 {
  switch act {
    case ACT_GELU_TANH: {
      return 0.5 * x * (1.0 + tanh_safe(0.7978845608028654 * (x + 0.044715 * x * x * x)));
    }
    case ACT_GELU_ERF: {
      return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476));
    }
    case ACT_SILU: {
      return x * sigmoid(x);
    }
    case ACT_RELU: {
      return max(x, 0.0);
    }
    case ACT_SIGMOID: {
      return sigmoid(x);
    }
    default: {
      return x;
    }
  }
}

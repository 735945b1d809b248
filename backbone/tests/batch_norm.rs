//! The native training-mode BatchNorm against candle's reference implementation: outputs, running
//! statistics and gradients.
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mobileone::layers::BatchNorm2d;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn training_mode_matches_candle_reference() {
    let dev = Device::Cpu;
    let (n, c, h, w) = (3, 5, 7, 6);
    let x =
        Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, h, w), &dev).unwrap() + 1.5).unwrap())
            .unwrap();
    let gamma = Tensor::rand(0.5f32, 1.5, c, &dev).unwrap();
    let beta = Tensor::randn(0f32, 0.3, c, &dev).unwrap();
    let mean0 = Tensor::randn(0f32, 0.1, c, &dev).unwrap();
    let var0 = Tensor::rand(0.5f32, 2.0, c, &dev).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();

    let build = || {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let bn = BatchNorm2d::new(vb.pp("bn"), c, 1e-5, 0.1).unwrap();
        for (name, value) in [
            ("weight", &gamma),
            ("bias", &beta),
            ("running_mean", &mean0),
            ("running_var", &var0),
        ] {
            map.data().lock().unwrap()[&format!("bn.{name}")]
                .set(value)
                .unwrap();
        }
        (map, bn)
    };
    let (ours_map, ours) = build();
    let (ref_map, _) = build();
    let reference = {
        let t = |k: &str| ref_map.data().lock().unwrap()[k].as_tensor().clone();
        candle_nn::BatchNorm::new_with_momentum(
            c,
            t("bn.running_mean"),
            t("bn.running_var"),
            t("bn.weight"),
            t("bn.bias"),
            1e-5,
            0.1,
        )
        .unwrap()
    };

    let y = ours.forward_t(x.as_tensor(), true).unwrap();
    let y_ref = reference.forward_train(x.as_tensor()).unwrap();
    assert!(
        max_abs_diff(&y, &y_ref) < 1e-5,
        "output differs by {}",
        max_abs_diff(&y, &y_ref)
    );

    for key in ["bn.running_mean", "bn.running_var"] {
        let a = ours_map.data().lock().unwrap()[key].as_tensor().clone();
        let b = ref_map.data().lock().unwrap()[key].as_tensor().clone();
        assert!(
            max_abs_diff(&a, &b) < 1e-5,
            "{key} differs by {}",
            max_abs_diff(&a, &b)
        );
    }

    let grads = (y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let ref_grads = (y_ref * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = grads.get(x.as_tensor()).unwrap();
    let dx_ref = ref_grads.get(x.as_tensor()).unwrap();
    let scale = dx_ref
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        max_abs_diff(dx, dx_ref) / scale < 1e-4,
        "dx differs by {}",
        max_abs_diff(dx, dx_ref)
    );
    for key in ["bn.weight", "bn.bias"] {
        let ours_p = ours_map.data().lock().unwrap()[key].as_tensor().clone();
        let ref_p = ref_map.data().lock().unwrap()[key].as_tensor().clone();
        let (g, g_ref) = (grads.get(&ours_p).unwrap(), ref_grads.get(&ref_p).unwrap());
        assert!(
            max_abs_diff(g, g_ref) < 1e-3,
            "d{key} differs by {}",
            max_abs_diff(g, g_ref)
        );
    }
}

#[test]
fn single_value_per_channel_is_an_error() {
    let bn = BatchNorm2d::new(VarBuilder::zeros(DType::F32, &Device::Cpu), 4, 1e-5, 0.1).unwrap();
    let x = Tensor::zeros((1, 4, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let err = bn.forward_t(&x, true).unwrap_err().to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
}

// Presets, construction from checkpoint shapes, and spec validation.
#include <gtest/gtest.h>

#include "dsv4/compressor.hpp"
#include "support/cases.hpp"

namespace dsv4 {
namespace {

TEST(Spec, PresetsMatchTheReleasedModels) {
  for (Model m : {Model::flash, Model::pro}) {
    const std::int64_t hidden = m == Model::flash ? 4096 : 7168;
    const auto main = CompressorSpec::preset(m, CompressorKind::csa_main);
    EXPECT_EQ(main.hidden, hidden);
    EXPECT_EQ(main.ratio, 4);
    EXPECT_EQ(main.head_dim, 512);
    EXPECT_TRUE(main.overlap());
    EXPECT_FALSE(main.rotate);
    EXPECT_EQ(main.projection_width(), 2048);
    EXPECT_EQ(main.entry_bytes(), 584);
    const auto idx = CompressorSpec::preset(m, CompressorKind::csa_indexer);
    EXPECT_EQ(idx.head_dim, 128);
    EXPECT_TRUE(idx.rotate);
    EXPECT_EQ(idx.projection_width(), 512);
    EXPECT_EQ(idx.entry_bytes(), 256);
    const auto hca = CompressorSpec::preset(m, CompressorKind::hca);
    EXPECT_EQ(hca.ratio, 128);
    EXPECT_FALSE(hca.overlap());
    EXPECT_EQ(hca.projection_width(), 1024);
    EXPECT_EQ(hca.entry_bytes(), 584);
    for (const auto& s : {main, idx, hca}) {
      EXPECT_NO_THROW(s.validate());
      EXPECT_EQ(s.rope.dim, 64);
      EXPECT_EQ(s.rope.theta, 160000.0);
      EXPECT_EQ(s.rope.yarn_factor, 16.0);
      EXPECT_EQ(s.rope.original_max_position, 65536);
      EXPECT_FLOAT_EQ(s.rms_eps, 1e-6f);
    }
  }
  EXPECT_EQ(model_shape(Model::flash).csa_layers, 21);
  EXPECT_EQ(model_shape(Model::flash).hca_layers, 20);
  EXPECT_EQ(model_shape(Model::pro).csa_layers, 30);
  EXPECT_EQ(model_shape(Model::pro).hca_layers, 31);
}

TEST(Spec, FromCheckpointShapes) {
  const auto main = CompressorSpec::from_shapes({1024, 4096}, {1024, 4096}, {4, 1024}, {512}, false);
  EXPECT_EQ(main, CompressorSpec::preset(Model::flash, CompressorKind::csa_main));
  const auto idx = CompressorSpec::from_shapes({256, 7168}, {256, 7168}, {4, 256}, {128}, true);
  EXPECT_EQ(idx, CompressorSpec::preset(Model::pro, CompressorKind::csa_indexer));
  const auto hca = CompressorSpec::from_shapes({512, 4096}, {512, 4096}, {128, 512}, {512}, false);
  EXPECT_EQ(hca, CompressorSpec::preset(Model::flash, CompressorKind::hca));
}

using test::expect_refused;

TEST(Spec, RejectsInconsistentShapes) {
  expect_refused([] { CompressorSpec::from_shapes({1024, 4096}, {1024, 4096}, {8, 1024}, {512}, false); }, "ratio, expected 4 or 128");
  expect_refused([] { CompressorSpec::from_shapes({1024, 4096}, {1024, 4096}, {4, 512}, {512}, false); }, "ape: expected shape [4, 1024]");
  expect_refused([] { CompressorSpec::from_shapes({1000, 4096}, {1024, 4096}, {4, 1024}, {512}, false); }, "wkv.weight: expected shape [1024, hidden]");
  expect_refused([] { CompressorSpec::from_shapes({1024, 4096}, {1024, 4000}, {4, 1024}, {512}, false); }, "wgate.weight");
  expect_refused([] { CompressorSpec::from_shapes({1024, 4096}, {1024, 4096}, {4, 1024}, {512, 1}, false); }, "norm.weight");
}

TEST(Spec, ValidationNamesTheField) {
  auto spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  spec.ratio = 8;
  expect_refused([&] { spec.validate(); }, "spec.ratio: expected 4 or 128, got 8");
  spec = CompressorSpec::preset(Model::flash, CompressorKind::hca);
  spec.head_dim = 500;  // 436 no-rope dims: not whole fp8 blocks
  expect_refused([&] { spec.validate(); }, "spec.head_dim: the fp8_ds entry needs");
  spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer);
  spec.head_dim = 96;
  expect_refused([&] { spec.validate(); }, "Hadamard rotation needs a power of two");
  spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  spec.rope.dim = 63;
  expect_refused([&] { spec.validate(); }, "spec.rope.dim");
  spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  spec.hidden = 0;
  expect_refused([&] { spec.validate(); }, "spec.hidden");
}

}  // namespace
}  // namespace dsv4

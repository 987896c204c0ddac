"""Token buckets and per-tenant quotas, on a fake clock."""

from dataclasses import dataclass

import pytest

from dreamblend_ray.serving.quotas import QuotaLimiter, Refusal, TokenBucket


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Quotas:
    requests_per_minute: int | None = None
    images_per_minute: int | None = None


@pytest.fixture()
def clock():
    return FakeClock()


def test_bucket_allows_its_rate_then_says_how_long_to_wait(clock):
    bucket = TokenBucket(60, clock=clock)  # one a second, burst 60
    assert all(bucket.take() == 0.0 for _ in range(60))
    assert bucket.take() == pytest.approx(1.0)
    assert bucket.take(3) == pytest.approx(3.0)  # nothing was taken by the refusals


def test_bucket_refills_continuously_up_to_its_burst(clock):
    bucket = TokenBucket(60, clock=clock, burst=5)
    assert all(bucket.take() == 0.0 for _ in range(5))
    assert bucket.take() > 0
    clock.advance(2.5)
    assert bucket.take(2) == 0.0
    assert bucket.take() == pytest.approx(0.5)
    clock.advance(3600)  # a long idle time refills only up to the burst
    assert bucket.take(5) == 0.0 and bucket.take() > 0


def test_bucket_request_above_burst_waits_for_a_full_bucket_and_leaves_debt(clock):
    bucket = TokenBucket(6, clock=clock)  # 0.1 token/s, burst 6
    assert bucket.take(10) == 0.0  # full: admitted, 4 tokens in debt
    assert bucket.take(1) == pytest.approx(50.0)
    clock.advance(100)  # back to 6 tokens
    assert bucket.take(1) == 0.0


def test_bucket_rejects_bad_arguments(clock):
    for rate in (0, -1, float("inf"), True):
        with pytest.raises(ValueError, match="rate_per_minute"):
            TokenBucket(rate, clock=clock)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, clock=clock, burst=0)
    with pytest.raises(ValueError, match="non-negative"):
        TokenBucket(10, clock=clock).take(-1)


def test_limiter_refuses_over_requests_with_retry_after(clock):
    limiter = QuotaLimiter(clock=clock)
    quotas = Quotas(requests_per_minute=2)
    assert limiter.check("a", quotas, images=1) is None
    assert limiter.check("a", quotas, images=1) is None
    refusal = limiter.check("a", quotas, images=1)
    assert refusal == Refusal("requests_per_minute", 30)  # one token every 30 s
    clock.advance(29.5)
    assert limiter.check("a", quotas, images=1) == Refusal("requests_per_minute", 1)  # at least 1
    clock.advance(0.5)
    assert limiter.check("a", quotas, images=1) is None


def test_image_refusal_does_not_consume_a_request_token(clock):
    limiter = QuotaLimiter(clock=clock)
    quotas = Quotas(requests_per_minute=2, images_per_minute=4)
    assert limiter.check("a", quotas, images=4) is None  # images used up, 1 request left
    for _ in range(5):
        refusal = limiter.check("a", quotas, images=1)
        assert refusal.quota == "images_per_minute" and refusal.retry_after_s == 15
    assert limiter.check("a", quotas, images=0) is None  # the request token is still there
    assert limiter.check("a", quotas, images=0).quota == "requests_per_minute"


def test_images_and_requests_are_independent(clock):
    limiter = QuotaLimiter(clock=clock)
    only_images = Quotas(images_per_minute=10)
    assert all(limiter.check("a", only_images, images=0) is None for _ in range(1000))
    only_requests = Quotas(requests_per_minute=3)
    assert all(limiter.check("b", only_requests, images=100) is None for _ in range(3))
    assert limiter.check("b", only_requests, images=0).quota == "requests_per_minute"


def test_tenants_have_separate_buckets(clock):
    limiter = QuotaLimiter(clock=clock)
    quotas = Quotas(requests_per_minute=1)
    assert limiter.check("a", quotas, images=1) is None
    assert limiter.check("a", quotas, images=1) is not None
    assert limiter.check("b", quotas, images=1) is None


def test_unlimited(clock):
    limiter = QuotaLimiter(clock=clock)
    assert all(limiter.check("a", Quotas(), images=10_000) is None for _ in range(100))
    assert all(limiter.check("a", None, images=10_000) is None for _ in range(100))


def test_share_divides_each_rate(clock):
    limiter = QuotaLimiter(share=0.25, clock=clock)  # 4 ingress replicas
    quotas = Quotas(requests_per_minute=40, images_per_minute=400)
    admitted = sum(limiter.check("a", quotas, images=1) is None for _ in range(100))
    assert admitted == 10  # this replica's burst: a quarter
    assert limiter.check("a", quotas, images=1).retry_after_s == 6  # 10 per minute here
    clock.advance(60)
    assert sum(limiter.check("a", quotas, images=10) is None for _ in range(100)) == 10
    assert limiter.check("a", quotas, images=10) is not None


def test_share_keeps_at_least_one_token(clock):
    limiter = QuotaLimiter(share=0.25, clock=clock)
    quotas = Quotas(requests_per_minute=2)  # half a request a minute on this replica
    assert limiter.check("a", quotas, images=0) is None
    assert limiter.check("a", quotas, images=0) == Refusal("requests_per_minute", 120)


def test_changed_quotas_rebuild_the_buckets(clock):
    limiter = QuotaLimiter(clock=clock)
    assert limiter.check("a", Quotas(requests_per_minute=1), images=0) is None
    assert limiter.check("a", Quotas(requests_per_minute=1), images=0) is not None
    raised = Quotas(requests_per_minute=5)  # the keys file was reloaded
    assert sum(limiter.check("a", raised, images=0) is None for _ in range(10)) == 5
    assert limiter.check("a", Quotas(requests_per_minute=5), images=0) is not None  # equal: kept


def test_memory_is_bounded(clock):
    limiter = QuotaLimiter(clock=clock, max_tenants=3)
    for tenant in "abcdef":
        limiter.check(tenant, Quotas(requests_per_minute=1), images=0)
    assert len(limiter) == 3


def test_bad_inputs_are_refused(clock):
    with pytest.raises(ValueError, match="share"):
        QuotaLimiter(share=0)
    with pytest.raises(ValueError, match="share"):
        QuotaLimiter(share=1.5)
    limiter = QuotaLimiter(clock=clock)
    with pytest.raises(ValueError, match="images"):
        limiter.check("a", Quotas(), images=-1)
    with pytest.raises(ValueError, match="requests_per_minute"):
        limiter.check("a", Quotas(requests_per_minute=0), images=1)
    with pytest.raises(ValueError, match="attribute"):
        limiter.check("a", object(), images=1)
    with pytest.raises(ValueError, match="quota"):
        Refusal("subjects", 1)
    with pytest.raises(ValueError, match="retry_after_s"):
        Refusal("images_per_minute", 0)

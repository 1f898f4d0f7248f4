package hostcgroup

import "testing"

func TestLimitsV1(t *testing.T) {
	r := Limits{MemoryBytes: 1 << 30, CPUQuota: 50000, CPUPeriod: 100000, CPUShares: 512}.v1()
	if *r.Memory.Limit != 1<<30 || *r.CPU.Quota != 50000 || *r.CPU.Period != 100000 || *r.CPU.Shares != 512 {
		t.Errorf("v1 resources %+v %+v", r.Memory, r.CPU)
	}
	r = Limits{}.v1()
	if r.Memory.Limit != nil || r.CPU.Quota != nil || r.CPU.Period != nil || r.CPU.Shares != nil {
		t.Errorf("no limits gave v1 resources %+v %+v", r.Memory, r.CPU)
	}
}

func TestLimitsV2(t *testing.T) {
	r := Limits{MemoryBytes: 1 << 30, CPUQuota: 50000, CPUPeriod: 100000, CPUShares: 1024}.v2()
	if *r.Memory.Max != 1<<30 || r.CPU.Max != "50000 100000" || *r.CPU.Weight != 39 {
		t.Errorf("v2 resources memory %v cpu.max %q weight %v", *r.Memory.Max, r.CPU.Max, *r.CPU.Weight)
	}
	if r := (Limits{}).v2(); r.Memory.Max != nil || r.CPU.Max != "" || r.CPU.Weight != nil {
		t.Errorf("no limits gave v2 resources %+v %+v", r.Memory, r.CPU)
	}
}

func TestSharesToWeight(t *testing.T) {
	for shares, want := range map[uint64]uint64{0: 1, 2: 1, 1024: 39, 262144: 10000, 1 << 40: 10000} {
		if got := sharesToWeight(shares); got != want {
			t.Errorf("sharesToWeight(%d) = %d, want %d", shares, got, want)
		}
	}
}

def sample_max(*a):
  raise NotImplementedError
